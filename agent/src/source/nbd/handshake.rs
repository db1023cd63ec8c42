//! Fixed newstyle negotiation: structured replies, the metadata contexts the caller wants (those
//! the server grants), and `NBD_OPT_GO` with block sizes, ending in the export's [`ExportInfo`].

use std::collections::HashMap;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use super::wire::*;
use super::{protocol, BoxRead, BoxWrite, ExportInfo, NbdError};

/// Option replies are strings (at most 4 KiB) and small fixed records.
const MAX_OPTION_REPLY: u32 = 64 << 10;

pub(super) struct Handshake {
    pub(super) rd: BufReader<BoxRead>,
    pub(super) wr: BoxWrite,
}

impl Handshake {
    pub(super) async fn run(
        &mut self,
        export: &str,
        contexts: &[&str],
    ) -> Result<(ExportInfo, HashMap<String, u32>), NbdError> {
        let magic = self.rd.read_u64().await?;
        let second = self.rd.read_u64().await?;
        if magic != NBDMAGIC {
            return Err(protocol(format!("not an NBD server (greeting {magic:#x})")));
        }
        if second == OLDSTYLE_MAGIC {
            return Err(protocol("the server speaks only oldstyle negotiation, which is not supported"));
        }
        if second != IHAVEOPT {
            return Err(protocol(format!("unexpected magic {second:#x} after NBDMAGIC")));
        }
        let flags = self.rd.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("the server does not support fixed newstyle negotiation"));
        }
        // Client flag bits mirror the server's handshake bits: fixed newstyle, no zeroes.
        let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        self.wr.write_all(&client_flags.to_be_bytes()).await?;

        self.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        let structured = match self.reply(OPT_STRUCTURED_REPLY).await? {
            (REP_ACK, _) => true,
            (REP_ERR_UNSUP, _) => false,
            (t, data) => return Err(refused(OPT_STRUCTURED_REPLY, t, &data, export)),
        };
        let mut granted = HashMap::new();
        if structured && !contexts.is_empty() {
            let mut data = BytesMut::new();
            data.put_u32(export.len() as u32);
            data.put_slice(export.as_bytes());
            data.put_u32(contexts.len() as u32);
            for c in contexts {
                data.put_u32(c.len() as u32);
                data.put_slice(c.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &data).await?;
            loop {
                match self.reply(OPT_SET_META_CONTEXT).await? {
                    (REP_ACK, _) => break,
                    (REP_META_CONTEXT, data) if data.len() > 4 => {
                        let mut d = &data[..];
                        let id = d.get_u32();
                        let name = String::from_utf8(d.to_vec())
                            .map_err(|_| protocol("metadata context name is not UTF-8"))?;
                        granted.insert(name, id);
                    }
                    // Without the option there are no contexts; callers see ContextUnavailable.
                    (REP_ERR_UNSUP, _) => break,
                    (t, data) => return Err(refused(OPT_SET_META_CONTEXT, t, &data, export)),
                }
            }
        }

        let mut data = BytesMut::new();
        data.put_u32(export.len() as u32);
        data.put_slice(export.as_bytes());
        data.put_u16(1);
        data.put_u16(INFO_BLOCK_SIZE);
        self.send_option(OPT_GO, &data).await?;
        let mut export_info = None;
        // The spec's defaults for servers that do not advertise block sizes (32 MiB reads at most).
        let (mut min, mut preferred, mut max) = (1u32, 4096u32, 32 << 20);
        loop {
            match self.reply(OPT_GO).await? {
                (REP_ACK, _) => break,
                (REP_INFO, data) if data.len() >= 2 => {
                    let mut d = &data[..];
                    match d.get_u16() {
                        INFO_EXPORT if d.len() == 10 => export_info = Some((d.get_u64(), d.get_u16())),
                        INFO_BLOCK_SIZE if d.len() == 12 => {
                            (min, preferred, max) = (d.get_u32(), d.get_u32(), d.get_u32())
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => {
                            return Err(protocol("NBD_REP_INFO of the wrong length"))
                        }
                        _ => {}
                    }
                }
                (t, data) => return Err(refused(OPT_GO, t, &data, export)),
            }
        }
        let (size, transmission_flags) =
            export_info.ok_or_else(|| protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"))?;
        if !min.is_power_of_two() || min > 64 << 10 || max < min {
            return Err(protocol(format!("invalid block sizes: minimum {min}, maximum {max}")));
        }
        let info = ExportInfo {
            size,
            transmission_flags,
            min_block: min,
            preferred_block: preferred,
            max_block: max,
            structured_replies: structured,
        };
        Ok((info, granted))
    }

    pub(super) async fn send_option(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let mut msg = BytesMut::with_capacity(16 + data.len());
        msg.put_u64(IHAVEOPT);
        msg.put_u32(option);
        msg.put_u32(data.len() as u32);
        msg.put_slice(data);
        self.wr.write_all(&msg).await?;
        self.wr.flush().await
    }

    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let magic = self.rd.read_u64().await?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(protocol(format!("bad option reply magic {magic:#x}")));
        }
        let echoed = self.rd.read_u32().await?;
        if echoed != option {
            return Err(protocol(format!("reply to option {echoed} while waiting for {option}")));
        }
        let reply = self.rd.read_u32().await?;
        let len = self.rd.read_u32().await?;
        if len > MAX_OPTION_REPLY {
            return Err(protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0; len as usize];
        self.rd.read_exact(&mut data).await?;
        Ok((reply, data))
    }
}

fn refused(option: u32, reply: u32, data: &[u8], export: &str) -> NbdError {
    if reply & (1 << 31) == 0 {
        return protocol(format!("unexpected reply {reply} to {}", option_name(option)));
    }
    let message = String::from_utf8_lossy(data).into_owned();
    // qemu-nbd already answers NBD_OPT_SET_META_CONTEXT for a missing export this way.
    if reply == REP_ERR_UNKNOWN {
        return NbdError::UnknownExport { export: export.to_string(), message };
    }
    NbdError::Refused { option: option_name(option), reply: rep_err_name(reply), message }
}
