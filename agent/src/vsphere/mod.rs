//! A small vSphere (vim25 SOAP over HTTPS) client with just what changed-block replication needs:
//! log in, find a VM and its disks, create a snapshot and read its disk's `changeId`, page
//! `QueryChangedDiskAreas`, remove the snapshot. Calls are blocking (run them on the blocking
//! pool); SOAP faults come back as `VsphereError::Fault` with vSphere's own words.

mod power;
mod xml;

use std::time::{Duration, Instant};

use quick_xml::escape::escape;

use crate::extents::Extent;
pub use xml::Node;

#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    #[error("vCenter {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("vCenter refused {call}: {fault} ({message})")]
    Fault { call: &'static str, fault: String, message: String },
    #[error("vCenter answered {call} with something unexpected: {0}", call = .1)]
    Unexpected(String, &'static str),
    #[error("task {task} failed: {message}")]
    Task { task: String, message: String },
    #[error("{0}")]
    NotFound(String),
}

/// A managed object reference, e.g. `VirtualMachine:vm-42`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    fn xml(&self, tag: &str) -> String {
        format!("<{tag} type=\"{}\">{}</{tag}>", escape(&self.kind), escape(&self.value))
    }
}

/// A virtual disk as seen in a VM's or snapshot's hardware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualDisk {
    pub key: i32,
    pub label: String,
    pub capacity: u64,
    pub file_name: String,
    /// CBT change id of this disk state (`<uuid>/<seq>`), when CBT is on.
    pub change_id: Option<String>,
}

/// One page of `QueryChangedDiskAreas` (VMware's DiskChangeInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePage {
    pub start_offset: u64,
    pub length: u64,
    pub areas: Vec<Extent>,
}

/// How to trust the vCenter certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Only this CA (PEM file).
    Ca(std::path::PathBuf),
    /// The system's web PKI roots.
    WebPki,
    /// Do not verify (labs only).
    Insecure,
}

pub struct Vsphere {
    agent: ureq::Agent,
    url: String,
    cookie: Option<String>,
    session_manager: MoRef,
    property_collector: MoRef,
    search_index: MoRef,
}

const NS: &str = "urn:vim25";
const SOAP_ACTION: &str = "urn:vim25/8.0.1.0";

fn envelope(body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    )
}

/// The SOAP fault in a response, in vSphere's own words: the fault's type (from the detail
/// element, e.g. `InvalidArgument`) and its faultstring.
pub fn fault_of(doc: &Node, call: &'static str) -> Option<VsphereError> {
    let f = doc.find("Fault")?;
    let message = f.text_of("faultstring").unwrap_or("").to_string();
    let fault = f
        .child("detail")
        .and_then(|d| d.children.first())
        .map(|d| {
            d.attr("type").map(str::to_string).unwrap_or_else(|| d.name.trim_end_matches("Fault").to_string())
        })
        .unwrap_or_else(|| "Fault".into());
    Some(VsphereError::Fault { call, fault, message })
}

impl ChangePage {
    const CALL: &'static str = "QueryChangedDiskAreas";

    /// The page in a `QueryChangedDiskAreas` response.
    pub fn from_response(doc: &Node) -> Result<ChangePage, VsphereError> {
        let rv = doc.find("returnval").ok_or(VsphereError::Unexpected("no returnval".into(), Self::CALL))?;
        let mut areas = Vec::new();
        for a in rv.all("changedArea") {
            areas.push(Extent::new(num(a, "start", Self::CALL)?, num(a, "length", Self::CALL)?));
        }
        Ok(ChangePage {
            start_offset: num(rv, "startOffset", Self::CALL)?,
            length: num(rv, "length", Self::CALL)?,
            areas,
        })
    }

    /// Check the page asked for at `pos` of a disk of `capacity` bytes: it starts there, moves
    /// forward, and every area lies inside it and the disk. Returns where the next page starts.
    pub fn check(&self, pos: u64, capacity: u64) -> Result<u64, VsphereError> {
        let end = self.start_offset.saturating_add(self.length);
        if self.start_offset != pos || end <= pos {
            return Err(VsphereError::Unexpected(
                format!("page for offset {pos} covers [{}, {end})", self.start_offset),
                Self::CALL,
            ));
        }
        for a in &self.areas {
            // An end past u64::MAX would wrap around and pass the bounds below.
            let a_end = a.offset.checked_add(a.len);
            if a.offset < self.start_offset || a_end.is_none_or(|e| e > end || e > capacity) {
                return Err(VsphereError::Unexpected(
                    format!(
                        "changed area of {} bytes at {} outside its page [{pos}, {end}) or the disk",
                        a.len, a.offset
                    ),
                    Self::CALL,
                ));
            }
        }
        Ok(end)
    }
}

fn num(n: &Node, name: &str, call: &'static str) -> Result<u64, VsphereError> {
    n.text_of(name)
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| VsphereError::Unexpected(format!("missing or bad <{name}>"), call))
}

impl Vsphere {
    /// Connect to `https://HOST[:PORT]/sdk` and log in.
    pub fn login(host: &str, user: &str, password: &str, trust: &Trust) -> Result<Vsphere, VsphereError> {
        let url = format!("https://{host}/sdk");
        let tls = match trust {
            Trust::WebPki => ureq::tls::TlsConfig::builder().build(),
            Trust::Insecure => ureq::tls::TlsConfig::builder().disable_verification(true).build(),
            Trust::Ca(path) => {
                let pem = std::fs::read(path).map_err(|e| VsphereError::Http {
                    url: url.clone(),
                    reason: format!("reading {}: {e}", path.display()),
                })?;
                let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                    .filter_map(|i| match i {
                        Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                        _ => None,
                    })
                    .collect();
                if certs.is_empty() {
                    return Err(VsphereError::Http {
                        url,
                        reason: format!("{} holds no certificate", path.display()),
                    });
                }
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build()
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_global(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut v = Vsphere {
            agent,
            url,
            cookie: None,
            session_manager: MoRef { kind: "SessionManager".into(), value: "SessionManager".into() },
            property_collector: MoRef { kind: "PropertyCollector".into(), value: "propertyCollector".into() },
            search_index: MoRef { kind: "SearchIndex".into(), value: "SearchIndex".into() },
        };
        let sc = v.call(
            "RetrieveServiceContent",
            &format!("<RetrieveServiceContent xmlns=\"{NS}\"><_this type=\"ServiceInstance\">ServiceInstance</_this></RetrieveServiceContent>"),
        )?;
        let rv = sc
            .find("returnval")
            .ok_or(VsphereError::Unexpected("no returnval".into(), "RetrieveServiceContent"))?;
        let mo = |name: &str| rv.child(name).and_then(Node::moref);
        v.session_manager = mo("sessionManager").unwrap_or(v.session_manager);
        v.property_collector = mo("propertyCollector").unwrap_or(v.property_collector);
        v.search_index = mo("searchIndex").unwrap_or(v.search_index);
        v.call(
            "Login",
            &format!(
                "<Login xmlns=\"{NS}\">{}<userName>{}</userName><password>{}</password></Login>",
                v.session_manager.xml("_this"),
                escape(user),
                escape(password)
            ),
        )?;
        if v.cookie.is_none() {
            return Err(VsphereError::Unexpected("no session cookie after Login".into(), "Login"));
        }
        Ok(v)
    }

    fn call(&mut self, call: &'static str, body: &str) -> Result<Node, VsphereError> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", SOAP_ACTION);
        if let Some(c) = &self.cookie {
            req = req.header("Cookie", c);
        }
        let http = |reason: String| VsphereError::Http { url: self.url.clone(), reason };
        let mut resp = req.send(envelope(body)).map_err(|e| http(e.to_string()))?;
        if let Some(c) = resp.headers().get("set-cookie").and_then(|v| v.to_str().ok()) {
            // Keep just NAME=VALUE of the session cookie.
            self.cookie = Some(c.split(';').next().unwrap_or(c).to_string());
        }
        let status = resp.status();
        let text = resp.body_mut().read_to_string().map_err(|e| http(e.to_string()))?;
        let doc = Node::parse(&text).map_err(|e| http(format!("HTTP {status}, {e}")))?;
        if let Some(fault) = fault_of(&doc, call) {
            return Err(fault);
        }
        if !status.is_success() {
            return Err(http(format!("HTTP {status}")));
        }
        Ok(doc)
    }

    /// A VM by BIOS UUID (`FindByUuid`) or by inventory path (`DC/vm/FOLDER/NAME`).
    pub fn find_vm(&mut self, vm: &str) -> Result<MoRef, VsphereError> {
        let looks_like_uuid = vm.len() == 36 && vm.chars().filter(|c| *c == '-').count() == 4;
        let body = if looks_like_uuid {
            format!(
                "<FindByUuid xmlns=\"{NS}\">{}<uuid>{}</uuid><vmSearch>true</vmSearch></FindByUuid>",
                self.search_index.xml("_this"),
                escape(vm)
            )
        } else {
            format!(
                "<FindByInventoryPath xmlns=\"{NS}\">{}<inventoryPath>{}</inventoryPath></FindByInventoryPath>",
                self.search_index.xml("_this"),
                escape(vm)
            )
        };
        let doc = self.call(if looks_like_uuid { "FindByUuid" } else { "FindByInventoryPath" }, &body)?;
        doc.find("returnval")
            .and_then(Node::moref)
            .ok_or_else(|| VsphereError::NotFound(format!("no VM {vm:?} on this vCenter")))
    }

    /// Properties `paths` of object `obj`, as (name, value node) pairs.
    fn properties(&mut self, obj: &MoRef, paths: &[&str]) -> Result<Vec<(String, Node)>, VsphereError> {
        let path_xml: String = paths.iter().map(|p| format!("<pathSet>{}</pathSet>", escape(*p))).collect();
        let body = format!(
            "<RetrievePropertiesEx xmlns=\"{NS}\">{}<specSet><propSet><type>{}</type>{path_xml}</propSet><objectSet>{}</objectSet></specSet><options/></RetrievePropertiesEx>",
            self.property_collector.xml("_this"),
            escape(&obj.kind),
            obj.xml("obj")
        );
        let doc = self.call("RetrievePropertiesEx", &body)?;
        let mut out = Vec::new();
        if let Some(rv) = doc.find("returnval") {
            for objects in rv.all("objects") {
                for p in objects.all("propSet") {
                    if let (Some(name), Some(val)) = (p.text_of("name"), p.child("val")) {
                        out.push((name.to_string(), val.clone()));
                    }
                }
            }
        }
        Ok(out)
    }

    fn disks_of(&mut self, obj: &MoRef) -> Result<Vec<VirtualDisk>, VsphereError> {
        let props = self.properties(obj, &["config.hardware.device"])?;
        let mut disks = Vec::new();
        for (_, val) in props {
            for dev in val.all("VirtualDevice") {
                if dev.attr("type") != Some("VirtualDisk") {
                    continue;
                }
                let key = dev.text_of("key").and_then(|k| k.parse().ok()).unwrap_or(-1);
                let capacity = num(dev, "capacityInBytes", "RetrievePropertiesEx")
                    .or_else(|_| num(dev, "capacityInKB", "RetrievePropertiesEx").map(|kb| kb * 1024))?;
                let label =
                    dev.child("deviceInfo").and_then(|d| d.text_of("label")).unwrap_or("").to_string();
                let backing = dev.child("backing");
                let file_name = backing.and_then(|b| b.text_of("fileName")).unwrap_or("").to_string();
                let change_id =
                    backing.and_then(|b| b.text_of("changeId")).map(str::to_string).filter(|s| !s.is_empty());
                disks.push(VirtualDisk { key, label, capacity, file_name, change_id });
            }
        }
        Ok(disks)
    }

    /// The VM's virtual disks and whether changed block tracking is enabled.
    pub fn vm_disks(&mut self, vm: &MoRef) -> Result<(Vec<VirtualDisk>, bool), VsphereError> {
        let cbt = self
            .properties(vm, &["config.changeTrackingEnabled"])?
            .into_iter()
            .any(|(_, v)| v.text.trim() == "true");
        Ok((self.disks_of(vm)?, cbt))
    }

    /// The disks of a snapshot (their backings carry the snapshot's changeIds).
    pub fn snapshot_disks(&mut self, snapshot: &MoRef) -> Result<Vec<VirtualDisk>, VsphereError> {
        self.disks_of(snapshot)
    }

    /// Snapshots of `vm` whose names start with `prefix` (name, moref).
    pub fn snapshots_named(
        &mut self,
        vm: &MoRef,
        prefix: &str,
    ) -> Result<Vec<(String, MoRef)>, VsphereError> {
        fn walk(n: &Node, prefix: &str, out: &mut Vec<(String, MoRef)>) {
            for t in n.all("rootSnapshotList").chain(n.all("childSnapshotList")) {
                if let (Some(name), Some(mo)) = (t.text_of("name"), t.child("snapshot").and_then(Node::moref))
                {
                    if name.starts_with(prefix) {
                        out.push((name.to_string(), mo));
                    }
                }
                walk(t, prefix, out);
            }
        }
        let mut out = Vec::new();
        for (_, val) in self.properties(vm, &["snapshot"])? {
            walk(&val, prefix, &mut out);
        }
        Ok(out)
    }

    fn wait_task(&mut self, task: &MoRef, call: &'static str) -> Result<Option<MoRef>, VsphereError> {
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut pause = Duration::from_millis(50);
        loop {
            let props = self.properties(task, &["info"])?;
            let info = props
                .iter()
                .find(|(n, _)| n == "info")
                .map(|(_, v)| v)
                .ok_or(VsphereError::Unexpected("task without info".into(), call))?;
            match info.text_of("state") {
                Some("success") => return Ok(info.child("result").and_then(Node::moref)),
                Some("error") => {
                    let message = info
                        .child("error")
                        .and_then(|e| e.text_of("localizedMessage"))
                        .unwrap_or("no message")
                        .to_string();
                    return Err(VsphereError::Task { task: format!("{call} ({})", task.value), message });
                }
                _ if Instant::now() > deadline => {
                    return Err(VsphereError::Task {
                        task: call.into(),
                        message: "did not finish in 30 minutes".into(),
                    })
                }
                _ => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Snapshot the VM (no memory); returns the snapshot.
    pub fn create_snapshot(&mut self, vm: &MoRef, name: &str, quiesce: bool) -> Result<MoRef, VsphereError> {
        let body = format!(
            "<CreateSnapshot_Task xmlns=\"{NS}\">{}<name>{}</name><description>Blockship replication point</description><memory>false</memory><quiesce>{quiesce}</quiesce></CreateSnapshot_Task>",
            vm.xml("_this"),
            escape(name)
        );
        let doc = self.call("CreateSnapshot_Task", &body)?;
        let task = doc
            .find("returnval")
            .and_then(Node::moref)
            .ok_or(VsphereError::Unexpected("no task".into(), "CreateSnapshot_Task"))?;
        self.wait_task(&task, "CreateSnapshot_Task")?.ok_or(VsphereError::Unexpected(
            "snapshot task returned no snapshot".into(),
            "CreateSnapshot_Task",
        ))
    }

    pub fn remove_snapshot(&mut self, snapshot: &MoRef) -> Result<(), VsphereError> {
        let body = format!(
            "<RemoveSnapshot_Task xmlns=\"{NS}\">{}<removeChildren>false</removeChildren><consolidate>true</consolidate></RemoveSnapshot_Task>",
            snapshot.xml("_this")
        );
        let doc = self.call("RemoveSnapshot_Task", &body)?;
        let task = doc
            .find("returnval")
            .and_then(Node::moref)
            .ok_or(VsphereError::Unexpected("no task".into(), "RemoveSnapshot_Task"))?;
        self.wait_task(&task, "RemoveSnapshot_Task").map(|_| ())
    }

    /// One page of changes of disk `device_key` in `snapshot` since `change_id` ("*": allocated
    /// areas), starting at `start_offset`.
    pub fn query_changed_disk_areas(
        &mut self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        start_offset: u64,
        change_id: &str,
    ) -> Result<ChangePage, VsphereError> {
        const CALL: &str = "QueryChangedDiskAreas";
        let body = format!(
            "<QueryChangedDiskAreas xmlns=\"{NS}\">{}{}<deviceKey>{device_key}</deviceKey><startOffset>{start_offset}</startOffset><changeId>{}</changeId></QueryChangedDiskAreas>",
            vm.xml("_this"),
            snapshot.xml("snapshot"),
            escape(change_id)
        );
        ChangePage::from_response(&self.call(CALL, &body)?)
    }

    /// All changes of a disk of `capacity` bytes since `change_id`, paging from offset 0 until
    /// the pages reach the capacity (an empty page is not the end).
    pub fn changed_areas(
        &mut self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        capacity: u64,
        change_id: &str,
    ) -> Result<(Vec<Extent>, usize), VsphereError> {
        let mut pos = 0u64;
        let mut all = Vec::new();
        let mut pages = 0;
        while pos < capacity {
            let page = self.query_changed_disk_areas(vm, snapshot, device_key, pos, change_id)?;
            pages += 1;
            let end = page.check(pos, capacity)?;
            all.extend(page.areas);
            pos = end;
        }
        Ok((crate::extents::normalize(all), pages))
    }

    pub fn logout(&mut self) {
        let body = format!("<Logout xmlns=\"{NS}\">{}</Logout>", self.session_manager.xml("_this"));
        let _ = self.call("Logout", &body);
    }
}

/// The UUID part of a changeId `<uuid>/<sequence>`.
pub fn change_id_uuid(change_id: &str) -> &str {
    change_id.split('/').next().unwrap_or(change_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_captured_qcda_response() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>10485760</startOffset><length>31457280</length><changedArea><start>10485760</start><length>131072</length></changedArea><changedArea><start>20971520</start><length>1048576</length></changedArea></returnval></QueryChangedDiskAreasResponse></soapenv:Body></soapenv:Envelope>"#;
        let doc = Node::parse(xml).unwrap();
        let rv = doc.find("returnval").unwrap();
        assert_eq!(num(rv, "startOffset", "t").unwrap(), 10485760);
        let areas: Vec<u64> = rv.all("changedArea").map(|a| num(a, "start", "t").unwrap()).collect();
        assert_eq!(areas, vec![10485760, 20971520]);
    }

    #[test]
    fn parses_faults_and_escapes() {
        let xml = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>A specified parameter was not correct: changeId &amp; more</faultstring><detail><InvalidArgumentFault xmlns="urn:vim25" xsi:type="InvalidArgument"><invalidProperty>changeId</invalidProperty></InvalidArgumentFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let doc = Node::parse(xml).unwrap();
        let f = doc.find("Fault").unwrap();
        assert_eq!(f.text_of("faultstring"), Some("A specified parameter was not correct: changeId & more"));
        assert_eq!(f.child("detail").unwrap().children[0].attr("type"), Some("InvalidArgument"));
        assert!(Node::parse("<a><b></a>").is_err());
        assert!(Node::parse("").is_err());
    }

    fn page(start: u64, length: u64, areas: &[(u64, u64)]) -> Node {
        let areas: String = areas
            .iter()
            .map(|(s, l)| format!("<changedArea><start>{s}</start><length>{l}</length></changedArea>"))
            .collect();
        let xml = format!(
            "<Envelope><Body><QueryChangedDiskAreasResponse><returnval><startOffset>{start}</startOffset>\
             <length>{length}</length>{areas}</returnval></QueryChangedDiskAreasResponse></Body></Envelope>"
        );
        Node::parse(&xml).unwrap()
    }

    #[test]
    fn change_pages_are_checked_against_the_request_and_the_disk() {
        let p = ChangePage::from_response(&page(0, 1 << 20, &[(4096, 4096)])).unwrap();
        assert_eq!(p.check(0, 1 << 30).unwrap(), 1 << 20);
        for (what, doc, pos) in [
            ("another offset", page(4096, 1 << 20, &[]), 0),
            ("empty page", page(0, 0, &[]), 0),
            ("area before the page", page(1 << 20, 1 << 20, &[(0, 4096)]), 1 << 20),
            ("area past the page", page(0, 1 << 20, &[((1 << 20) - 1, 2)]), 0),
            ("area past the disk", page(0, 1 << 31, &[(1 << 30, 1)]), 0),
            // A vCenter (or a man in the middle with the CA) naming an area whose end wraps
            // around must not slip past the bounds.
            ("area end overflows", page(0, 1 << 20, &[(u64::MAX - 1, 10)]), 0),
        ] {
            let p = ChangePage::from_response(&doc).unwrap();
            assert!(p.check(pos, 1 << 30).is_err(), "{what}: accepted");
        }
        assert!(ChangePage::from_response(&Node::parse("<a><returnval/></a>").unwrap()).is_err());
    }

    #[test]
    fn change_id_parts() {
        assert_eq!(change_id_uuid("52 d3 aa 1f-77/12"), "52 d3 aa 1f-77");
        assert_eq!(change_id_uuid("*"), "*");
    }
}
