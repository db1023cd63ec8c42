//! VMware DiskChangeInfo as JSON (the `QueryChangedDiskAreas` result): one page object or an
//! array of pages `{"startOffset":N,"length":N,"changedArea":[{"start":N,"length":N},...]}`, in
//! bytes. The pages must tile the disk exactly and every area must lie inside its page and the
//! disk; anything else is refused with a message naming the page and area, before any data moves.

use serde_json::Value;

use crate::extents::{normalize, Extent};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChangeListError {
    #[error("change list is not valid JSON: {0}")]
    Json(String),
    #[error("change list: {0}")]
    Shape(String),
    #[error("change list, {at}: {problem}")]
    Bad { at: String, problem: String },
    #[error("change list pages do not cover the disk: {0}")]
    Coverage(String),
}

struct Page {
    number: usize,
    start: u64,
    len: u64,
    areas: Vec<(usize, u64, u64)>,
}

fn field(obj: &serde_json::Map<String, Value>, name: &str, at: &str) -> Result<u64, ChangeListError> {
    let bad = |problem: String| ChangeListError::Bad { at: at.to_string(), problem };
    let v = obj.get(name).ok_or_else(|| bad(format!("missing \"{name}\"")))?;
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Ok(u)
            } else if n.as_i64().is_some_and(|i| i < 0) {
                Err(bad(format!("\"{name}\" is negative ({n})")))
            } else {
                Err(bad(format!("\"{name}\" is not a whole number of bytes ({n})")))
            }
        }
        other => Err(bad(format!("\"{name}\" must be a number, found {other}"))),
    }
}

/// Parse and validate a DiskChangeInfo document for a disk of `disk_size` bytes; returns the
/// changed extents, sorted and merged.
pub fn parse(text: &str, disk_size: u64) -> Result<Vec<Extent>, ChangeListError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| ChangeListError::Json(e.to_string()))?;
    let raw_pages = match doc {
        Value::Array(pages) => pages,
        obj @ Value::Object(_) => vec![obj],
        _ => {
            return Err(ChangeListError::Shape("expected a DiskChangeInfo object or an array of them".into()))
        }
    };
    if raw_pages.is_empty() {
        return Err(ChangeListError::Shape("no pages".into()));
    }
    let mut pages = Vec::with_capacity(raw_pages.len());
    for (i, p) in raw_pages.iter().enumerate() {
        let number = i + 1;
        let at = format!("page {number}");
        let obj = p
            .as_object()
            .ok_or_else(|| ChangeListError::Bad { at: at.clone(), problem: "not an object".into() })?;
        let start = field(obj, "startOffset", &at)?;
        let len = field(obj, "length", &at)?;
        let at = format!("page {number} (startOffset {start}, length {len})");
        if start.checked_add(len).is_none() {
            return Err(ChangeListError::Bad { at, problem: "startOffset + length overflows".into() });
        }
        let mut areas = Vec::new();
        match obj.get("changedArea") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for (j, a) in list.iter().enumerate() {
                    let at = format!("{at}, changedArea[{j}]");
                    let aobj = a.as_object().ok_or_else(|| ChangeListError::Bad {
                        at: at.clone(),
                        problem: "not an object".into(),
                    })?;
                    areas.push((j, field(aobj, "start", &at)?, field(aobj, "length", &at)?));
                }
            }
            Some(other) => {
                return Err(ChangeListError::Bad {
                    at,
                    problem: format!("\"changedArea\" must be an array, found {other}"),
                })
            }
        }
        pages.push(Page { number, start, len, areas });
    }

    pages.sort_by_key(|p| (p.start, p.len));
    let mut covered = 0u64;
    for p in &pages {
        if p.start > covered {
            return Err(ChangeListError::Coverage(format!(
                "bytes [{covered}, {}) are in no page (page {} starts at {})",
                p.start, p.number, p.start
            )));
        }
        if p.start < covered {
            return Err(ChangeListError::Coverage(format!(
                "page {} [{}, {}) overlaps the previous page, which ends at {covered}",
                p.number,
                p.start,
                p.start + p.len
            )));
        }
        covered = p.start + p.len;
    }
    if covered != disk_size {
        return Err(ChangeListError::Coverage(format!(
            "the pages end at {covered} but the disk has {disk_size} bytes{}",
            if covered > disk_size { " (change list of a larger disk?)" } else { "" }
        )));
    }

    let mut extents = Vec::new();
    for p in &pages {
        for &(j, start, len) in &p.areas {
            let at = format!(
                "page {} (startOffset {}), changedArea[{j}] {{start {start}, length {len}}}",
                p.number, p.start
            );
            let end = start.checked_add(len).ok_or_else(|| ChangeListError::Bad {
                at: at.clone(),
                problem: "start + length overflows".into(),
            })?;
            if end > disk_size {
                return Err(ChangeListError::Bad {
                    at,
                    problem: format!("extends past the end of the disk ({disk_size} bytes)"),
                });
            }
            if start < p.start || end > p.start + p.len {
                return Err(ChangeListError::Bad {
                    at,
                    problem: format!("lies outside its page [{}, {})", p.start, p.start + p.len),
                });
            }
            extents.push(Extent::new(start, len));
        }
    }
    Ok(normalize(extents))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn single_page_and_paged_forms() {
        let one = r#"{"startOffset":0,"length":4194304,"changedArea":[{"start":1048576,"length":4096},{"start":0,"length":512}]}"#;
        assert_eq!(parse(one, 4 * MB).unwrap(), vec![Extent::new(0, 512), Extent::new(MB, 4096)]);
        let paged = r#"[
            {"startOffset":2097152,"length":2097152,"changedArea":[{"start":3145728,"length":1048576}]},
            {"startOffset":0,"length":1048576,"changedArea":[{"start":0,"length":1048576}]},
            {"startOffset":1048576,"length":1048576,"changedArea":[]}
        ]"#;
        assert_eq!(parse(paged, 4 * MB).unwrap(), vec![Extent::new(0, MB), Extent::new(3 * MB, MB)]);
        let no_areas = r#"{"startOffset":0,"length":1024}"#;
        assert_eq!(parse(no_areas, 1024).unwrap(), vec![]);
    }

    fn err(text: &str, size: u64) -> String {
        parse(text, size).unwrap_err().to_string()
    }

    #[test]
    fn bad_extents_are_named() {
        let e = err(r#"{"startOffset":0,"length":2048,"changedArea":[{"start":1024,"length":2048}]}"#, 2048);
        assert!(e.contains("changedArea[0]") && e.contains("past the end of the disk"), "{e}");
        let e = err(r#"{"startOffset":0,"length":2048,"changedArea":[{"start":-5,"length":10}]}"#, 2048);
        assert!(e.contains("changedArea[0]") && e.contains("negative"), "{e}");
        let e = err(
            r#"[{"startOffset":0,"length":1024,"changedArea":[{"start":1000,"length":48}]},{"startOffset":1024,"length":1024}]"#,
            2048,
        );
        assert!(e.contains("outside its page [0, 1024)"), "{e}");
        let e = err(r#"{"startOffset":0,"length":1.5}"#, 2048);
        assert!(e.contains("not a whole number"), "{e}");
        let e = err(r#"{"startOffset":"0","length":10}"#, 10);
        assert!(e.contains("must be a number"), "{e}");
        assert!(matches!(parse("{", 10), Err(ChangeListError::Json(_))));
        assert!(matches!(parse("[]", 10), Err(ChangeListError::Shape(_))));
    }

    #[test]
    fn pages_must_tile_the_disk() {
        let overlap = r#"[{"startOffset":0,"length":1536},{"startOffset":1024,"length":1024}]"#;
        assert!(err(overlap, 2048).contains("overlaps"), "{}", err(overlap, 2048));
        let gap = r#"[{"startOffset":0,"length":1024},{"startOffset":1536,"length":512}]"#;
        assert!(err(gap, 2048).contains("[1024, 1536) are in no page"));
        let short = r#"{"startOffset":0,"length":1024}"#;
        assert!(err(short, 2048).contains("end at 1024 but the disk has 2048"));
        let long = r#"{"startOffset":0,"length":4096}"#;
        assert!(err(long, 2048).contains("larger disk"));
        let not_at_zero = r#"{"startOffset":512,"length":1536}"#;
        assert!(err(not_at_zero, 2048).contains("[0, 512) are in no page"));
    }
}
