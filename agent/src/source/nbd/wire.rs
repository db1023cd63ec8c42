//! The numbers of the NBD protocol (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>)
//! that this client uses, the names it gives them in errors, and the request header.

use bytes::BufMut;

pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(super) const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(super) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(super) const FLAG_NO_ZEROES: u16 = 1 << 1;

pub(super) const OPT_ABORT: u32 = 2;
pub(super) const OPT_GO: u32 = 7;
pub(super) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(super) const OPT_SET_META_CONTEXT: u32 = 10;

pub(super) const REP_ACK: u32 = 1;
pub(super) const REP_INFO: u32 = 3;
pub(super) const REP_META_CONTEXT: u32 = 4;
pub(super) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub(super) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub(super) const INFO_EXPORT: u16 = 0;
pub(super) const INFO_BLOCK_SIZE: u16 = 3;

pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const CMD_BLOCK_STATUS: u16 = 7;

pub(super) const REPLY_FLAG_DONE: u16 = 1 << 0;
pub(super) const REPLY_NONE: u16 = 0;
pub(super) const REPLY_OFFSET_DATA: u16 = 1;
pub(super) const REPLY_OFFSET_HOLE: u16 = 2;
pub(super) const REPLY_BLOCK_STATUS: u16 = 5;
pub(super) const REPLY_ERROR_OFFSET: u16 = (1 << 15) + 2;

pub(super) fn errno_name(errno: u32) -> String {
    let name = match errno {
        1 => "EPERM (operation not permitted)",
        5 => "EIO (input/output error)",
        12 => "ENOMEM (out of memory)",
        22 => "EINVAL (invalid argument)",
        28 => "ENOSPC (no space left)",
        75 => "EOVERFLOW (value too large)",
        95 => "ENOTSUP (not supported)",
        108 => "ESHUTDOWN (server is shutting down)",
        _ => return format!("error {errno}"),
    };
    name.to_string()
}

pub(super) fn rep_err_name(reply: u32) -> String {
    let name = match reply.wrapping_sub(1 << 31) {
        1 => "NBD_REP_ERR_UNSUP (option not supported)",
        2 => "NBD_REP_ERR_POLICY (forbidden by server policy)",
        3 => "NBD_REP_ERR_INVALID (invalid request)",
        4 => "NBD_REP_ERR_PLATFORM (not supported on the server's platform)",
        5 => "NBD_REP_ERR_TLS_REQD (the server requires TLS, which this client does not speak)",
        7 => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD (block sizes must be negotiated)",
        9 => "NBD_REP_ERR_TOO_BIG (request or reply too large)",
        _ => return format!("option reply {reply:#x}"),
    };
    name.to_string()
}

pub(super) fn option_name(option: u32) -> &'static str {
    match option {
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an option",
    }
}

pub(super) fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_BLOCK_STATUS => "block status",
        _ => "command",
    }
}

pub(super) fn request_header(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    let mut b = &mut h[..];
    b.put_u32(REQUEST_MAGIC);
    b.put_u16(0);
    b.put_u16(cmd);
    b.put_u64(cookie);
    b.put_u64(offset);
    b.put_u32(len);
    h
}
