//! A fake vCenter for tests: HTTPS (self-signed) speaking the vim25 SOAP messages Blockship uses
//! (RetrieveServiceContent, Login/Logout, FindByUuid, RetrievePropertiesEx, CreateSnapshot_Task,
//! RemoveSnapshot_Task, QueryChangedDiskAreas) for one VM with one or more disks (keys 2000,
//! 2001, ...). Tests record the writes they make to a disk image; QueryChangedDiskAreas answers
//! from that log, in pages, and can be told to fault or to reset change tracking (new changeId
//! UUID). With `freeze_disk`, every snapshot freezes a copy of every disk image
//! (`<dir>/<snapshot moref>-<disk key>.img`, kept under its changeId as well after the snapshot
//! is removed), so a data command can serve the snapshot's own data while the "guest" goes on
//! writing the live images. govmomi's vcsim cannot do this:
//! it does not implement QueryChangedDiskAreas.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use blockship_agent::vsphere::Node;

pub const VM_UUID: &str = "4213c2d5-1d6b-3a5f-9e7c-0123456789ab";
pub const VM_MOREF: &str = "vm-42";
pub const DISK_KEY: i32 = 2000;

#[derive(Debug, Default)]
pub struct State {
    pub capacity: u64,
    pub cbt_enabled: bool,
    pub cbt_uuid: String,
    /// Sequence number of the newest snapshot.
    pub seq: u64,
    /// Disks of the VM (keys DISK_KEY, DISK_KEY + 1, ...), all of `capacity`.
    pub disks: usize,
    /// Writes (sequence, disk index, offset, length), each tagged with the snapshot sequence
    /// current when it happened.
    pub writes: Vec<(u64, usize, u64, u64)>,
    /// Areas in use before any recorded write, on every disk (changeId "*" adds the writes).
    pub allocated: Vec<(u64, u64)>,
    /// (moref, name, changeId)
    pub snapshots: Vec<(String, String, String)>,
    pub page_size: u64,
    /// The VM's `runtime.powerState`, and whether its guest has VMware Tools running (guest
    /// shutdown works) or not (`ShutdownGuest` faults with ToolsUnavailable).
    pub power: String,
    pub tools: bool,
    /// Fault message for the next QueryChangedDiskAreas.
    pub fail_qcda: Option<String>,
    /// Every SOAP call, in order (method names).
    pub calls: Vec<String>,
    /// The live disk images copied into `snap_dir` at every snapshot (see `freeze_disk`).
    pub disk_images: Vec<PathBuf>,
    pub snap_dir: PathBuf,
    next: u64,
    session: Option<String>,
}

pub struct FakeVcenter {
    pub addr: String,
    pub ca: PathBuf,
    pub state: Arc<Mutex<State>>,
    _dir: tempfile::TempDir,
}

impl FakeVcenter {
    pub fn start(capacity: u64, page_size: u64) -> FakeVcenter {
        Self::start_with_disks(capacity, page_size, 1)
    }

    /// A VM with `disks` disks of `capacity` each.
    pub fn start_with_disks(capacity: u64, page_size: u64, disks: usize) -> FakeVcenter {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.path().join("vcenter.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        let der = rustls::pki_types::CertificateDer::from(cert.der().to_vec());
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let tls = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![der], key_der)
                .unwrap(),
        );
        let snap_dir = dir.path().join("snapshots");
        std::fs::create_dir_all(&snap_dir).unwrap();
        let state = Arc::new(Mutex::new(State {
            snap_dir,
            capacity,
            disks,
            cbt_enabled: true,
            cbt_uuid: "52 1f a0 9c 44 d2 11 0e-8b 3a 5c 6d 7e 8f 90 a1".into(),
            page_size,
            power: "poweredOn".into(),
            tools: true,
            ..Default::default()
        }));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (st, tls) = (st.clone(), tls.clone());
                std::thread::spawn(move || {
                    let Ok(server) = rustls::ServerConnection::new(tls) else { return };
                    let mut stream = rustls::StreamOwned::new(server, conn);
                    while let Some((cookie_in, body)) = read_request(&mut stream) {
                        let (status, cookie, xml) = handle(&st, cookie_in.as_deref(), &body);
                        let mut head = format!(
                            "HTTP/1.1 {status}\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\n",
                            xml.len()
                        );
                        if let Some(c) = cookie {
                            head.push_str(&format!(
                                "Set-Cookie: vmware_soap_session=\"{c}\"; Path=/; HttpOnly; Secure\r\n"
                            ));
                        }
                        head.push_str("\r\n");
                        if stream
                            .write_all(head.as_bytes())
                            .and_then(|_| stream.write_all(xml.as_bytes()))
                            .is_err()
                        {
                            return;
                        }
                        let _ = stream.flush();
                    }
                });
            }
        });
        FakeVcenter { addr, ca, state, _dir: dir }
    }

    /// Freeze a copy of `image` (the first disk) at every snapshot; returns the directory the
    /// copies live in (`$BLOCKSHIP_SNAPSHOT-$BLOCKSHIP_DISK_KEY.img` is the snapshot's data).
    pub fn freeze_disk(&self, image: &std::path::Path) -> PathBuf {
        self.freeze_disks(&[image.to_path_buf()])
    }

    /// Freeze a copy of every disk's image (in key order) at every snapshot.
    pub fn freeze_disks(&self, images: &[PathBuf]) -> PathBuf {
        let mut s = self.state.lock().unwrap();
        s.disk_images = images.to_vec();
        s.snap_dir.clone()
    }

    /// The first disk's frozen data in the snapshot that carried `change_id` (kept after the
    /// snapshot's removal).
    pub fn snapshot_data(&self, change_id: &str) -> PathBuf {
        self.snapshot_data_of(0, change_id)
    }

    /// Disk `disk`'s frozen data in the snapshot that carried `change_id`.
    pub fn snapshot_data_of(&self, disk: usize, change_id: &str) -> PathBuf {
        let s = self.state.lock().unwrap();
        // "<uuid>/<seq>-<key>"
        let seq = change_id.rsplit('/').next().unwrap_or("").split('-').next().unwrap_or("");
        s.snap_dir.join(format!("cid-{seq}-{}.img", DISK_KEY + disk as i32))
    }

    pub fn record_write(&self, offset: u64, len: u64) {
        self.record_write_on(0, offset, len)
    }

    pub fn record_write_on(&self, disk: usize, offset: u64, len: u64) {
        let mut s = self.state.lock().unwrap();
        let seq = s.seq;
        s.writes.push((seq, disk, offset, len));
    }

    /// Names of the snapshots ever created, in order.
    pub fn snapshots_created(&self) -> usize {
        self.state.lock().unwrap().calls.iter().filter(|c| *c == "CreateSnapshot_Task").count()
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn snapshots(&self) -> Vec<String> {
        self.state.lock().unwrap().snapshots.iter().map(|s| s.1.clone()).collect()
    }
}

/// (Cookie header, body) of the next request on a keep-alive connection.
fn read_request(stream: &mut impl Read) -> Option<(Option<String>, String)> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    if line.is_empty() {
        return None;
    }
    let mut len = 0usize;
    let mut cookie = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        if lower.starts_with("cookie:") {
            cookie = Some(h["cookie:".len()..].trim().to_string());
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((cookie, String::from_utf8(body).ok()?))
}

fn envelope(inner: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"
    )
}

fn fault(kind: &str, message: &str) -> (&'static str, Option<String>, String) {
    (
        "500 Internal Server Error",
        None,
        envelope(&format!(
            "<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>{message}</faultstring><detail><{kind}Fault xmlns=\"urn:vim25\" xsi:type=\"{kind}\"></{kind}Fault></detail></soapenv:Fault>"
        )),
    )
}

fn ok(method: &str, inner: &str) -> (&'static str, Option<String>, String) {
    ("200 OK", None, envelope(&format!("<{method}Response xmlns=\"urn:vim25\">{inner}</{method}Response>")))
}

/// Every disk of the VM; each disk's changeId is its own ("<uuid>/<seq>-<key>"), as vSphere's are.
fn disks_xml(s: &State, change_id: Option<&str>) -> String {
    (0..s.disks)
        .map(|i| {
            let key = DISK_KEY + i as i32;
            let cid = change_id.map(|c| format!("<changeId>{c}-{key}</changeId>")).unwrap_or_default();
            let file = if i == 0 { "vm42".to_string() } else { format!("vm42_{i}") };
            format!(
                "<VirtualDevice xsi:type=\"VirtualDisk\"><key>{key}</key><deviceInfo><label>Hard disk {}</label><summary>x</summary></deviceInfo><backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>[datastore1] vm42/{file}.vmdk</fileName><diskMode>persistent</diskMode>{cid}</backing><capacityInKB>{}</capacityInKB><capacityInBytes>{}</capacityInBytes></VirtualDevice>",
                i + 1,
                s.capacity / 1024,
                s.capacity
            )
        })
        .collect()
}

fn handle(
    st: &Arc<Mutex<State>>,
    cookie: Option<&str>,
    body: &str,
) -> (&'static str, Option<String>, String) {
    let Ok(doc) = Node::parse(body) else { return fault("InvalidRequest", "unparsable request") };
    let Some(req) = doc.find("Body").and_then(|b| b.children.first()) else {
        return fault("InvalidRequest", "no body");
    };
    let method = req.name.clone();
    let mut s = st.lock().unwrap();
    s.calls.push(method.clone());
    let logged_in = match (&s.session, cookie) {
        (Some(sess), Some(c)) => c == format!("vmware_soap_session=\"{sess}\""),
        _ => false,
    };
    if !logged_in && method != "RetrieveServiceContent" && method != "Login" {
        return fault("NotAuthenticated", "The session is not authenticated.");
    }
    match method.as_str() {
        "RetrieveServiceContent" => ok(
            &method,
            "<returnval><rootFolder type=\"Folder\">group-d1</rootFolder><propertyCollector type=\"PropertyCollector\">propertyCollector</propertyCollector><about><apiVersion>8.0.1.0</apiVersion></about><searchIndex type=\"SearchIndex\">SearchIndex</searchIndex><sessionManager type=\"SessionManager\">SessionManager</sessionManager></returnval>",
        ),
        "Login" => {
            if req.text_of("userName") != Some("administrator@vsphere.local") || req.text_of("password") != Some("s3cret") {
                return fault("InvalidLogin", "Cannot complete login due to an incorrect user name or password.");
            }
            s.next += 1;
            let cookie = format!("session-{}", s.next);
            s.session = Some(cookie.clone());
            let (st, _, xml) = ok(&method, "<returnval><key>k</key><userName>administrator@vsphere.local</userName></returnval>");
            (st, Some(cookie), xml)
        }
        "Logout" => ok(&method, ""),
        "FindByUuid" => {
            if req.text_of("uuid") == Some(VM_UUID) {
                ok(&method, &format!("<returnval type=\"VirtualMachine\">{VM_MOREF}</returnval>"))
            } else {
                ok(&method, "")
            }
        }
        "FindByInventoryPath" => {
            if req.text_of("inventoryPath") == Some("dc1/vm/vm42") {
                ok(&method, &format!("<returnval type=\"VirtualMachine\">{VM_MOREF}</returnval>"))
            } else {
                ok(&method, "")
            }
        }
        "RetrievePropertiesEx" => {
            let Some(obj) = req.find("obj") else { return fault("InvalidArgument", "no obj") };
            let (kind, id) = (obj.attr("type").unwrap_or("").to_string(), obj.text.clone());
            let path = req.find("pathSet").map(|p| p.text.clone()).unwrap_or_default();
            let val = match (kind.as_str(), path.as_str()) {
                ("VirtualMachine", "config.hardware.device") => {
                    format!("<val xsi:type=\"ArrayOfVirtualDevice\">{}</val>", disks_xml(&s, None))
                }
                ("VirtualMachine", "runtime.powerState") => {
                    format!("<val xsi:type=\"VirtualMachinePowerState\">{}</val>", s.power)
                }
                ("VirtualMachine", "config.changeTrackingEnabled") => {
                    format!("<val xsi:type=\"xsd:boolean\">{}</val>", s.cbt_enabled)
                }
                ("VirtualMachine", "snapshot") => {
                    let trees: String = s
                        .snapshots
                        .iter()
                        .map(|(mo, name, _)| {
                            format!("<rootSnapshotList><snapshot type=\"VirtualMachineSnapshot\">{mo}</snapshot><vm type=\"VirtualMachine\">{VM_MOREF}</vm><name>{name}</name></rootSnapshotList>")
                        })
                        .collect();
                    format!("<val xsi:type=\"VirtualMachineSnapshotInfo\">{trees}</val>")
                }
                ("VirtualMachineSnapshot", "config.hardware.device") => {
                    let Some((_, _, cid)) = s.snapshots.iter().find(|(mo, _, _)| *mo == id) else {
                        return fault("ManagedObjectNotFound", "The object has already been deleted or has not been completely created");
                    };
                    let cid = s.cbt_enabled.then(|| cid.clone());
                    format!("<val xsi:type=\"ArrayOfVirtualDevice\">{}</val>", disks_xml(&s, cid.as_deref()))
                }
                ("Task", "info") => format!(
                    "<val xsi:type=\"TaskInfo\"><key>{id}</key><state>success</state>{}</val>",
                    id.strip_prefix("task-snap-").map(|mo| format!("<result type=\"VirtualMachineSnapshot\">{mo}</result>")).unwrap_or_default()
                ),
                _ => return fault("InvalidProperty", &format!("{kind}.{path}")),
            };
            ok(
                &method,
                &format!("<returnval><objects><obj type=\"{kind}\">{id}</obj><propSet><name>{path}</name>{val}</propSet></objects></returnval>"),
            )
        }
        "CreateSnapshot_Task" => {
            s.seq += 1;
            s.next += 1;
            let mo = format!("snapshot-{}", s.next);
            let cid = format!("{}/{}", s.cbt_uuid, s.seq);
            let name = req.text_of("name").unwrap_or("").to_string();
            for (i, disk) in s.disk_images.iter().enumerate() {
                let key = DISK_KEY + i as i32;
                let copy = s.snap_dir.join(format!("{mo}-{key}.img"));
                std::fs::copy(disk, &copy).unwrap();
                std::fs::copy(&copy, s.snap_dir.join(format!("cid-{}-{key}.img", s.seq))).unwrap();
            }
            s.snapshots.push((mo.clone(), name, cid));
            ok(&method, &format!("<returnval type=\"Task\">task-snap-{mo}</returnval>"))
        }
        "ShutdownGuest" if !s.tools => fault("ToolsUnavailable", "VMware Tools is not running in the guest"),
        "ShutdownGuest" => {
            s.power = "poweredOff".into();
            ok(&method, "")
        }
        "PowerOffVM_Task" | "PowerOnVM_Task" => {
            let on = method == "PowerOnVM_Task";
            let want = if on { "poweredOff" } else { "poweredOn" };
            if s.power != want {
                return fault("InvalidPowerState", &format!("The attempted operation cannot be performed in the current state ({}).", s.power));
            }
            s.power = if on { "poweredOn" } else { "poweredOff" }.into();
            ok(&method, "<returnval type=\"Task\">task-power</returnval>")
        }
        "RemoveSnapshot_Task" => {
            let mo = req.find("_this").map(|t| t.text.clone()).unwrap_or_default();
            s.snapshots.retain(|(m, _, _)| *m != mo);
            for i in 0..s.disks {
                let _ = std::fs::remove_file(s.snap_dir.join(format!("{mo}-{}.img", DISK_KEY + i as i32)));
            }
            ok(&method, "<returnval type=\"Task\">task-remove</returnval>")
        }
        "QueryChangedDiskAreas" => {
            if let Some(msg) = s.fail_qcda.take() {
                return fault("FileFault", &msg);
            }
            let snap = req.find("snapshot").map(|t| t.text.clone()).unwrap_or_default();
            let Some((_, _, snap_cid)) = s.snapshots.iter().find(|(mo, _, _)| *mo == snap).cloned() else {
                return fault("InvalidArgument", "A specified parameter was not correct: snapshot");
            };
            let start: u64 = req.text_of("startOffset").and_then(|v| v.parse().ok()).unwrap_or(0);
            let key: i32 = req.text_of("deviceKey").and_then(|v| v.parse().ok()).unwrap_or(-1);
            let disk = (key - DISK_KEY) as usize;
            if key < DISK_KEY || disk >= s.disks {
                return fault("InvalidArgument", "A specified parameter was not correct: deviceKey");
            }
            let change_id = req.text_of("changeId").unwrap_or("").to_string();
            let mine = s.writes.iter().filter(|w| w.1 == disk);
            let extents: Vec<(u64, u64)> = if change_id == "*" {
                // Everything in use: the initial layout plus whatever was written since.
                s.allocated.iter().copied().chain(mine.map(|(_, _, o, l)| (*o, *l))).collect()
            } else {
                // This disk's own changeId: "<uuid>/<seq>-<key>".
                let Some(change_id) = change_id.strip_suffix(&format!("-{key}")) else {
                    return fault("InvalidArgument", "A specified parameter was not correct: changeId");
                };
                let (uuid, seq) = change_id.rsplit_once('/').unwrap_or(("", ""));
                let (snap_uuid, snap_seq) = snap_cid.rsplit_once('/').unwrap_or(("", ""));
                let (Ok(from), Ok(to)) = (seq.parse::<u64>(), snap_seq.parse::<u64>()) else {
                    return fault("InvalidArgument", "A specified parameter was not correct: changeId");
                };
                if uuid != snap_uuid || uuid != s.cbt_uuid {
                    return fault("InvalidArgument", "A specified parameter was not correct: changeId");
                }
                mine.filter(|(w, _, _, _)| *w >= from && *w < to).map(|(_, _, o, l)| (*o, *l)).collect()
            };
            let end = (start + s.page_size).min(s.capacity);
            let areas: String = extents
                .iter()
                .filter_map(|&(o, l)| {
                    let (a, b) = (o.max(start), (o + l).min(end));
                    (a < b).then(|| format!("<changedArea><start>{a}</start><length>{}</length></changedArea>", b - a))
                })
                .collect();
            ok(
                &method,
                &format!("<returnval><startOffset>{start}</startOffset><length>{}</length>{areas}</returnval>", end - start),
            )
        }
        other => fault("MethodNotFound", &format!("method {other} not implemented by the fake vCenter")),
    }
}

/// A VMware VM with two disks, each image frozen at every snapshot, and the `[agent]` lines that
/// reach its fake vCenter.
pub struct VmwareVm {
    pub vc: FakeVcenter,
    pub images: Vec<std::path::PathBuf>,
    pub agent: String,
}

pub fn vmware_vm(lab: &super::Lab, size: u64) -> VmwareVm {
    use blockship_bench::image::{self, Kind, Profile, REGION};
    let images: Vec<_> = (0..2).map(|i| lab.path(&format!("vm42-{i}-flat.img"))).collect();
    for (i, p) in images.iter().enumerate() {
        image::generate(p, size, Profile::Mixed, 40 + i as u64).unwrap();
    }
    let vc = FakeVcenter::start_with_disks(size, size / 2, 2);
    let snaps = vc.freeze_disks(&images);
    vc.state.lock().unwrap().allocated = (0..size / REGION)
        .filter(|i| Profile::Mixed.kind(*i) != Kind::Zero)
        .map(|i| (i * REGION, REGION))
        .collect();
    let pw = lab.path("vc-password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    // The data command serves one disk of the snapshot, as nbdkit vddk does.
    let cmd = format!(
        "exec qemu-nbd -r -f raw -t --socket \\\"$BLOCKSHIP_NBD_SOCKET\\\" {}/\\\"$BLOCKSHIP_SNAPSHOT-$BLOCKSHIP_DISK_KEY\\\".img",
        snaps.display()
    );
    let agent = format!(
        "vcenter_user = \"administrator@vsphere.local\"\nvcenter_password_file = \"{}\"\nvcenter_ca = \"{}\"\nnbd_command = \"{cmd}\"\n",
        pw.display(),
        vc.ca.display()
    );
    VmwareVm { vc, images, agent }
}

impl VmwareVm {
    pub fn write(&self, disk: usize, offset: u64, len: u64, seed: u64) {
        super::scribble(&self.images[disk], offset, len as usize, seed);
        self.vc.record_write_on(disk, offset, len);
    }

    /// Both targets hold the snapshot their recorded changeIds came from, and those changeIds
    /// are the same snapshot's.
    pub fn check_epoch(&self, lab: &super::Lab, targets: &[&str], seq: u64) {
        for (i, t) in targets.iter().enumerate() {
            let state = super::state_of(lab, t).unwrap();
            let cid = state["change_point"].as_str().unwrap_or_default().to_string();
            let want = format!("/{seq}-{}", DISK_KEY + i as i32);
            assert!(cid.ends_with(&want), "{t}: changeId {cid:?} is not snapshot {seq}'s: {state}");
            let rel = t.strip_prefix("file:").unwrap();
            assert!(
                super::same_file(&self.vc.snapshot_data_of(i, &cid), &lab.target(rel)),
                "{t} differs from its disk in snapshot {seq}"
            );
        }
    }
}
