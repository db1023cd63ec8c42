//! Where an export lives: NBD URIs as the NBD project specifies them, TCP or Unix socket.

use std::fmt;
use std::path::PathBuf;

use super::NbdError;

/// Where an export lives: TCP host and port, or a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md>):
/// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub addr: NbdAddr,
    pub export: String,
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<NbdUri, NbdError> {
        let bad = |reason: &str| NbdError::BadUri { uri: uri.to_string(), reason: reason.to_string() };
        let usage = "expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad(usage))?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => return Err(bad("TLS (nbds) is not supported")),
            _ => return Err(bad(&format!("unknown scheme {scheme:?}; {usage}"))),
        };
        if rest.contains('#') {
            return Err(bad("an NBD URI has no fragment (#...)"));
        }
        let (rest, query) = rest.split_once('?').map_or((rest, None), |(r, q)| (r, Some(q)));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let export = percent_decode(path).ok_or_else(|| bad("bad percent-encoding in the export name"))?;
        if export.len() > 4096 {
            return Err(bad("the export name is longer than 4096 bytes"));
        }
        let mut socket = None;
        for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "socket" if unix && socket.is_none() => {
                    socket = Some(percent_decode(value).ok_or_else(|| bad("bad percent-encoding in socket"))?)
                }
                "socket" if unix => return Err(bad("socket is given twice")),
                _ => return Err(bad(&format!("unsupported query parameter {key:?}"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad("a Unix socket URI has no host: nbd+unix:///EXPORT?socket=PATH"));
            }
            match socket {
                None => return Err(bad("missing ?socket=PATH")),
                Some(s) if s.is_empty() => return Err(bad("empty socket path")),
                Some(s) if s.starts_with('\0') => return Err(bad("abstract Unix sockets are not supported")),
                Some(s) => NbdAddr::Unix(PathBuf::from(s)),
            }
        } else {
            if authority.contains('@') {
                return Err(bad("user info is only used for TLS, which is not supported"));
            }
            let (host, port) = split_host_port(authority).map_err(|r| bad(&r))?;
            NbdAddr::Tcp { host, port }
        };
        Ok(NbdUri { addr, export })
    }

    /// The export's identity without where its Unix socket happens to live (often a temp dir).
    pub fn disk_id(&self) -> String {
        match &self.addr {
            NbdAddr::Tcp { .. } => self.to_string(),
            NbdAddr::Unix(_) => format!("nbd+unix:///{}", self.export),
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, rest) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        match rest {
            "" => (host, None),
            r => (host, Some(r.strip_prefix(':').ok_or("junk after ]")?)),
        }
    } else {
        match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => return Err("an IPv6 host must be written in brackets".into()),
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    let port = match port {
        None => 10809,
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| format!("bad port {p:?}"))?,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}
