//! Launching a guest: a [`Vm`] with a guest program installed, booted and running, and the
//! dirty tracker that watches it. What `ferry vm run`, `ferry demo` and the tests start from.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyError, KvmDirtyLog, VmmDirty};
use crate::guest::{self, GuestError, GuestParams};
use crate::memory::GuestMemory;
use crate::vm::{Serial, Vm, VmError};

/// Default largest memory region (and KVM slot); larger guests get several regions.
pub const DEFAULT_REGION_BYTES: u64 = 1 << 30;

/// What to run: memory size and the guest program with its parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestSpec {
    pub mem_bytes: u64,
    /// Largest memory region (KVM slot), a multiple of 2 MiB; default 1 GiB.
    pub region_bytes: u64,
    pub guest: GuestParams,
}

/// Errors launching a guest.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("installing the guest program")]
    Guest(#[from] GuestError),
    #[error("setting up dirty tracking")]
    Dirty(#[from] DirtyError),
    #[error("region size {0} is not a non-zero multiple of 2 MiB")]
    RegionSize(u64),
}

/// A running VM and its dirty tracker.
pub struct Launched {
    pub vm: Vm,
    pub tracker: KvmDirtyLog,
    pub vmm_dirty: Arc<VmmDirty>,
}

/// Creates the VM, installs and boots the guest program, and starts the vCPUs.
pub fn launch(spec: &GuestSpec, serial: Arc<Serial>) -> Result<Launched, LaunchError> {
    if spec.region_bytes == 0 || spec.region_bytes % (2 << 20) != 0 {
        return Err(LaunchError::RegionSize(spec.region_bytes));
    }
    let layout = GuestMemory::simple_layout(spec.mem_bytes, spec.region_bytes);
    let mut vm = Vm::new(&layout, spec.guest.vcpus, serial)?;
    let mut params = spec.guest.clone();
    params.tsc_khz = vm.tsc_khz()?;
    let gl = guest::install(vm.memory(), &params)?;
    vm.for_each_vcpu(|i, fd| gl.boot_state(i).configure(fd).map_err(LaunchError::from))?;
    let vmm_dirty = Arc::new(VmmDirty::new(vm.memory().page_span()));
    let tracker = KvmDirtyLog::new(Arc::clone(vm.fd()), vm.memory(), Arc::clone(&vmm_dirty))?;
    vm.start()?;
    Ok(Launched {
        vm,
        tracker,
        vmm_dirty,
    })
}
