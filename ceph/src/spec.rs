//! The name of one RBD image, `POOL/IMAGE` or `POOL/NAMESPACE/IMAGE`: parsed here once for the
//! agent's `rbd:` sources and the sink's `rbd:` targets, so both sides accept and print exactly
//! the same names.

use std::fmt;

/// Why an image name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad RBD image name {name:?}: expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE (no empty parts, no '@', at most 255 bytes each)")]
pub struct SpecError {
    pub name: String,
}

/// Pool, optional namespace and image. `Display` prints `POOL[/NAMESPACE]/IMAGE`; `uri()`
/// adds the `rbd:` prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RbdSpec {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
}

impl RbdSpec {
    /// Parses `POOL/IMAGE` or `POOL/NAMESPACE/IMAGE` (the part after `rbd:`). A snapshot
    /// (`@`) is refused: sources and targets name images, Blockship picks the snapshots.
    pub fn parse(rest: &str) -> Result<Self, SpecError> {
        let bad = || SpecError { name: rest.to_string() };
        let parts: Vec<&str> = rest.split('/').collect();
        let ok = |s: &&str| !s.is_empty() && !s.contains(['@', '\0']) && s.len() <= 255;
        if !parts.iter().all(ok) {
            return Err(bad());
        }
        match parts.as_slice() {
            [pool, image] => {
                Ok(RbdSpec { pool: pool.to_string(), namespace: None, image: image.to_string() })
            }
            [pool, ns, image] => Ok(RbdSpec {
                pool: pool.to_string(),
                namespace: Some(ns.to_string()),
                image: image.to_string(),
            }),
            _ => Err(bad()),
        }
    }

    /// Parses `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`.
    pub fn parse_uri(s: &str) -> Result<Self, SpecError> {
        let rest = s.strip_prefix("rbd:").ok_or_else(|| SpecError { name: s.to_string() })?;
        Self::parse(rest).map_err(|_| SpecError { name: s.to_string() })
    }

    /// `rbd:POOL[/NAMESPACE]/IMAGE`.
    pub fn uri(&self) -> String {
        format!("rbd:{self}")
    }
}

impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.pool, ns, self.image),
            None => write!(f, "{}/{}", self.pool, self.image),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let s = RbdSpec::parse("rbd/img").unwrap();
        assert_eq!(s, RbdSpec { pool: "rbd".into(), namespace: None, image: "img".into() });
        assert_eq!(s.uri(), "rbd:rbd/img");
        let s = RbdSpec::parse_uri("rbd:volumes/tenant-a/volume-1").unwrap();
        assert_eq!(s.namespace.as_deref(), Some("tenant-a"));
        assert_eq!(s.to_string(), "volumes/tenant-a/volume-1");
        assert_eq!(RbdSpec::parse_uri(&s.uri()).unwrap(), s);
    }

    #[test]
    fn bad_names_are_refused() {
        let long = format!("p/{}", "x".repeat(256));
        for bad in ["", "img", "p/", "/i", "p//i", "p/i@snap", "p/n/i/x", "p/i\0", long.as_str()] {
            assert!(RbdSpec::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RbdSpec::parse_uri("volumes/img").is_err(), "the rbd: prefix is required");
        assert!(RbdSpec::parse_uri("file:volumes/img").is_err());
    }
}
