//! A tiny XML tree, enough for vim25 responses: elements by local name (namespaces dropped),
//! attributes, and trimmed text with entity and character references resolved. Anything
//! malformed is an error, never a panic (the `vsphere_soap` fuzz target checks that).

use quick_xml::events::Event;
use quick_xml::Reader;

use super::MoRef;

/// A tiny XML tree, enough for vim25 responses.
#[derive(Debug, Default, Clone)]
pub struct Node {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    pub fn parse(xml: &str) -> Result<Node, String> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Node> = vec![Node::default()];
        loop {
            match reader.read_event().map_err(|e| format!("bad XML at {}: {e}", reader.buffer_position()))? {
                Event::Start(e) => stack.push(Node::open(&e)?),
                Event::Empty(e) => {
                    let n = Node::open(&e)?;
                    stack.last_mut().ok_or("unbalanced XML")?.children.push(n);
                }
                Event::End(_) => {
                    let mut n = stack.pop().ok_or("unbalanced XML")?;
                    // Trim once the element is complete: entity references split its text.
                    n.text = n.text.trim().to_string();
                    stack.last_mut().ok_or("unbalanced XML")?.children.push(n);
                }
                Event::Text(t) => {
                    stack.last_mut().ok_or("unbalanced XML")?.text.push_str(&t.xml10_content());
                }
                // Entity and character references arrive as their own events.
                Event::GeneralRef(r) => {
                    let text = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                        Some(c) => c.to_string(),
                        None => quick_xml::escape::resolve_predefined_entity(&r)
                            .ok_or_else(|| format!("unknown XML entity &{};", &*r))?
                            .to_string(),
                    };
                    stack.last_mut().ok_or("unbalanced XML")?.text.push_str(&text);
                }
                Event::Eof => break,
                _ => {}
            }
        }
        let mut root = stack.pop().ok_or("empty XML")?;
        if !stack.is_empty() {
            return Err("unclosed XML element".into());
        }
        root.children.pop().ok_or_else(|| "no XML element".to_string())
    }

    fn open(e: &quick_xml::events::BytesStart) -> Result<Node, String> {
        let name = e.local_name().as_ref().to_string();
        let mut attrs = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|e| e.to_string())?;
            let v = a
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|e| e.to_string())?
                .into_owned();
            attrs.push((a.key.local_name().as_ref().to_string(), v));
        }
        Ok(Node { name, attrs, ..Default::default() })
    }

    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> {
        self.children.iter().filter(move |c| c.name == name)
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Depth-first search for the first element called `name`.
    pub fn find(&self, name: &str) -> Option<&Node> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }

    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|n| n.text.as_str())
    }

    pub(super) fn moref(&self) -> Option<MoRef> {
        Some(MoRef { kind: self.attr("type")?.to_string(), value: self.text.clone() })
    }
}
