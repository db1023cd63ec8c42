//! Arbitrary text as a vCenter's SOAP response: the XML tree, the fault extraction and a
//! `QueryChangedDiskAreas` page with its checks. Errors, never panics; a page that passes its
//! checks has every changed area inside itself and the disk.
#![no_main]

use blockship_agent::vsphere::{fault_of, ChangePage, Node};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(doc) = Node::parse(text) else { return };
    let _ = fault_of(&doc, "fuzz");
    let _ = doc.find("returnval").map(|r| (r.attr("type"), r.text_of("val"), r.all("x").count()));
    let Ok(page) = ChangePage::from_response(&doc) else { return };
    let capacity = page.start_offset.saturating_add(page.length / 2 + 1);
    if let Ok(end) = page.check(page.start_offset, capacity) {
        assert!(end > page.start_offset);
        for a in &page.areas {
            assert!(a.offset >= page.start_offset && a.end() <= end && a.end() <= capacity);
        }
    }
});
