//! A VM's power state through vCenter, for a cutover: ask the guest to shut down (VMware Tools'
//! `ShutdownGuest`, which returns at once), wait for the VM to be powered off, and power it off
//! (`PowerOffVM_Task`) when the guest does not within the timeout or has no Tools; power it on
//! again (`PowerOnVM_Task`) when a cutover is aborted. Each call is a no-op in the state asked for.

use std::time::{Duration, Instant};

use super::{MoRef, Node, Vsphere, VsphereError, NS};

impl Vsphere {
    /// `poweredOn`, `poweredOff` or `suspended`.
    pub fn power_state(&mut self, vm: &MoRef) -> Result<String, VsphereError> {
        self.properties(vm, &["runtime.powerState"])?
            .into_iter()
            .next()
            .map(|(_, v)| v.text.trim().to_string())
            .ok_or(VsphereError::Unexpected("no runtime.powerState".into(), "RetrievePropertiesEx"))
    }

    /// Power the VM off: a clean guest shutdown within `shutdown_timeout`, else a hard power
    /// off. Returns how it went, for the operator.
    pub fn stop_vm(&mut self, vm: &MoRef, shutdown_timeout: Duration) -> Result<String, VsphereError> {
        if self.power_state(vm)? == "poweredOff" {
            return Ok("VM already powered off".into());
        }
        let body = format!("<ShutdownGuest xmlns=\"{NS}\">{}</ShutdownGuest>", vm.xml("_this"));
        let shutdown = match self.call("ShutdownGuest", &body) {
            Ok(_) => {
                let deadline = Instant::now() + shutdown_timeout;
                loop {
                    if self.power_state(vm)? == "poweredOff" {
                        return Ok("guest shut down".into());
                    }
                    if Instant::now() >= deadline {
                        break format!("guest still running after {shutdown_timeout:?}");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            // No VMware Tools in the guest, or Tools not running: power off is all there is.
            Err(VsphereError::Fault { fault, message, .. }) => {
                format!("guest shutdown refused: {fault} ({message})")
            }
            Err(e) => return Err(e),
        };
        self.task(vm, "PowerOffVM_Task")?;
        Ok(format!("{shutdown}; powered off"))
    }

    /// Power the VM on (after an aborted cutover).
    pub fn start_vm(&mut self, vm: &MoRef) -> Result<String, VsphereError> {
        if self.power_state(vm)? == "poweredOn" {
            return Ok("VM already powered on".into());
        }
        self.task(vm, "PowerOnVM_Task")?;
        Ok("powered on".into())
    }

    fn task(&mut self, vm: &MoRef, method: &'static str) -> Result<(), VsphereError> {
        let body = format!("<{method} xmlns=\"{NS}\">{}</{method}>", vm.xml("_this"));
        let doc = self.call(method, &body)?;
        let task = doc
            .find("returnval")
            .and_then(Node::moref)
            .ok_or(VsphereError::Unexpected("no task".into(), method))?;
        self.wait_task(&task, method).map(|_| ())
    }
}
