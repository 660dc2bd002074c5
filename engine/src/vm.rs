//! The micro-VM: a KVM VM with anonymous guest memory, an in-kernel irqchip, one thread
//! per vCPU, an emulated serial port, pause/resume, and save/restore of everything needed
//! to resume the guest in another process.
//!
//! vCPU threads are kicked out of `KVM_RUN` with a real-time signal whose handler does
//! nothing; `KVM_RUN` then returns `EINTR` and the thread parks until resumed. The thread
//! that pauses keeps signalling until every vCPU has parked, so a signal that arrives just
//! before a thread enters the guest is not lost.
//!
//! ## State this KVM supports (probed on the PVM flavour this project runs on)
//!
//! `KVM_GET/SET_REGS`, `SREGS`, `XSAVE` (4 KiB), `XCRS`, `MSRS` (the host's MSR index list,
//! minus those the vCPU refuses), `LAPIC`, `VCPU_EVENTS`, `MP_STATE`, `DEBUGREGS`, `CLOCK`
//! and `IRQCHIP` (PIC and IOAPIC) all work; there is no PIT (none is created). `HLT` with
//! the in-kernel irqchip blocks in the kernel until an interrupt: rate-limited guests sleep
//! in `hlt` and are woken by their x2APIC timer; they report through port I/O.
//! See `docs/architecture.md`.
//!
//! ## Throttle and over-commit
//!
//! [`Vm::set_throttle`] takes a share of vCPU time away, the way QEMU's auto-converge does: a
//! ticker thread kicks every vCPU out of `KVM_RUN` every [`THROTTLE_SLICE`], and a vCPU that has
//! run for a slice sleeps `ran × p / (1 − p)` before entering the guest again (woken early by a
//! pause). [`Vm::overcommit`] packs the vCPU threads onto fewer cores (TLM's CPU over-commit)
//! and puts their own affinity back when called with `None`.

use std::collections::VecDeque;
use std::io::Write;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId,
    Msrs, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::memory::{GuestMemory, Layout, MemoryError};

/// COM1's data port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Bits for `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`: manual protect, and every
/// page starts dirty (so never-sent pages need no write protection until they are sent).
const MANUAL_PROTECT_ENABLE: u64 = 1;
const MANUAL_PROTECT_INIT_SET: u64 = 2;

/// Errors of the micro-VM. Each names the KVM operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm (is KVM available and are we root?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM operation {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM operation {op} failed on vCPU {vcpu}")]
    Vcpu {
        op: &'static str,
        vcpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("this KVM lacks {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the VM state is for {theirs} vCPUs, this VM has {ours}")]
    StateShape { ours: usize, theirs: usize },
    #[error("setting the vCPU threads' CPU affinity")]
    Affinity(#[source] crate::topo::TopoError),
    #[error("{0} requires the vCPUs to be paused")]
    NotPaused(&'static str),
    #[error("spawning the thread for vCPU {vcpu}")]
    Spawn {
        vcpu: u32,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, VmError>;

/// Where the guest's serial output goes. Lines are assembled per vCPU so that output of
/// several vCPUs does not interleave within a line.
pub struct Serial {
    sink: Mutex<Option<Box<dyn Write + Send>>>,
    prefix: String,
    recent: Mutex<VecDeque<String>>,
}

impl Serial {
    /// How many recent lines are kept for [`Serial::recent`].
    const KEEP: usize = 256;

    /// Serial output to `sink` (or nowhere), each line prefixed with `prefix`.
    pub fn new(sink: Option<Box<dyn Write + Send>>, prefix: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            sink: Mutex::new(sink),
            prefix: prefix.into(),
            recent: Mutex::new(VecDeque::new()),
        })
    }

    fn line(&self, line: &str) {
        if let Some(sink) = self.sink.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            // Serial output is best effort: a closed stdout must not stop the guest.
            let _ = writeln!(sink, "{}{}", self.prefix, line);
            let _ = sink.flush();
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == Self::KEEP {
            recent.pop_front();
        }
        recent.push_back(line.to_string());
    }

    /// The most recent complete lines (at most 256), oldest first.
    pub fn recent(&self) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }
}

/// Saved state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    msrs: Vec<kvm_msr_entry>,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    debugregs: kvm_debugregs,
}

/// Saved state of the whole VM, apart from memory: what the destination needs to resume.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    clock: kvm_clock_data,
    irqchips: Vec<kvm_irqchip>,
}

impl VmState {
    /// Encodes the state for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        bincode::serialize(self).expect("VmState serialization cannot fail")
    }
    /// Decodes a state received from the wire.
    pub fn from_bytes(b: &[u8]) -> std::result::Result<Self, bincode::Error> {
        use bincode::Options;
        bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .allow_trailing_bytes()
            .with_limit(16 << 20)
            .deserialize(b)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RunState {
    Running,
    Paused,
    Stopped,
}

struct Control {
    state: Mutex<(RunState, usize)>, // (requested state, parked vCPUs)
    cv: Condvar,
    /// Share of vCPU time taken away, in millionths (0 = none).
    throttle_ppm: AtomicU32,
}

impl Control {
    fn throttle(&self) -> f64 {
        f64::from(self.throttle_ppm.load(Ordering::Relaxed)) / 1e6
    }
}

/// How often a throttled vCPU is kicked out of the guest to see whether it must sleep.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// The most vCPU time a throttle may take away.
pub const MAX_THROTTLE: f64 = 0.99;

/// A KVM VM with its memory and vCPU threads.
pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    mem: Arc<GuestMemory>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    /// Each vCPU's `immediate_exit`, set with every kick that pauses or stops it.
    exits: Vec<ExitFlag>,
    threads: Vec<JoinHandle<()>>,
    /// Kicks the vCPUs while a throttle is set.
    ticker: Option<JoinHandle<()>>,
    control: Arc<Control>,
    /// Each vCPU thread's own affinity, saved while over-committed.
    saved_affinity: Mutex<Option<Vec<Vec<usize>>>>,
    serial: Arc<Serial>,
    msr_indices: Vec<u32>,
    started: AtomicBool,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

/// A vCPU's `kvm_run.immediate_exit`. A kick signal that lands after the vCPU thread saw the
/// VM running but before it entered `KVM_RUN` would be lost, and the vCPU would run on until
/// its next exit (the pause then waits a retry, 2 ms, in the downtime); with the flag set
/// first, `KVM_RUN` returns at once instead.
#[derive(Clone, Copy)]
struct ExitFlag(NonNull<u8>);

// SAFETY: the flag lives in the vCPU's kvm_run mapping, which its `VcpuFd` keeps for as long
// as the VM (and every vCPU thread) holds that fd; it is only accessed atomically here.
unsafe impl Send for ExitFlag {}
// SAFETY: as for `Send`: shared, the flag is still only read and written atomically.
unsafe impl Sync for ExitFlag {}

impl ExitFlag {
    fn of(v: &mut VcpuFd) -> Self {
        Self(NonNull::from(&mut v.get_kvm_run().immediate_exit))
    }

    fn set(self, on: bool) {
        // SAFETY: see the `Send` impl; a u8 is always aligned, and the kernel reads the flag
        // only on entering KVM_RUN.
        unsafe { AtomicU8::from_ptr(self.0.as_ptr()) }.store(u8::from(on), Ordering::SeqCst);
    }
}

impl Vm {
    /// Creates a VM with fresh guest memory laid out as `layout` and `vcpus` vCPUs, dirty
    /// logging enabled on every slot (manual protect, initially all set).
    pub fn new(layout: &Layout, vcpus: u32, serial: Arc<Serial>) -> Result<Self> {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            // A failure here would only make pausing slower (it retries); nothing to do.
            let _ = register_signal_handler(kick_signal(), kick_handler);
        });
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_VM",
            source,
        })?;
        if fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) == 0 {
            return Err(VmError::Missing("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"));
        }
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = MANUAL_PROTECT_ENABLE | MANUAL_PROTECT_INIT_SET;
        fd.enable_cap(&cap).map_err(|source| VmError::Kvm {
            op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
            source,
        })?;
        let mem = Arc::new(GuestMemory::new(layout)?);
        for (slot, r) in mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: r.gpa(),
                memory_size: r.len(),
                userspace_addr: r.host_addr(),
            };
            // SAFETY: the region maps `r.len()` bytes at `r.host_addr()`, owned by `mem`,
            // which this VM keeps alive for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION",
                source,
            })?;
        }
        fd.create_irq_chip().map_err(|source| VmError::Kvm {
            op: "KVM_CREATE_IRQCHIP",
            source,
        })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let (mut fds, mut exits) = (Vec::new(), Vec::new());
        for i in 0..vcpus {
            let mut v = fd.create_vcpu(i.into()).map_err(|source| VmError::Vcpu {
                op: "KVM_CREATE_VCPU",
                vcpu: i,
                source,
            })?;
            let mut c: CpuId = cpuid.clone();
            for e in c.as_mut_slice() {
                if e.function == 1 {
                    // Initial APIC id in EBX[31:24].
                    e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24);
                }
            }
            v.set_cpuid2(&c).map_err(|source| VmError::Vcpu {
                op: "KVM_SET_CPUID2",
                vcpu: i,
                source,
            })?;
            exits.push(ExitFlag::of(&mut v));
            fds.push(Arc::new(Mutex::new(v)));
        }
        let msr_indices = Self::usable_msrs(&kvm, &fds[0])?;
        Ok(Self {
            _kvm: kvm,
            fd: Arc::new(fd),
            mem,
            vcpus: fds,
            exits,
            threads: Vec::new(),
            ticker: None,
            control: Arc::new(Control {
                state: Mutex::new((RunState::Paused, 0)),
                cv: Condvar::new(),
                throttle_ppm: AtomicU32::new(0),
            }),
            saved_affinity: Mutex::new(None),
            serial,
            msr_indices,
            started: AtomicBool::new(false),
        })
    }

    /// The MSRs of the host's index list that this vCPU lets us read.
    fn usable_msrs(kvm: &Kvm, vcpu: &Mutex<VcpuFd>) -> Result<Vec<u32>> {
        let list = kvm.get_msr_index_list().map_err(|source| VmError::Kvm {
            op: "KVM_GET_MSR_INDEX_LIST",
            source,
        })?;
        let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let mut ok = Vec::new();
        for &index in list.as_slice() {
            let mut m = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .expect("one MSR entry fits");
            if vcpu.get_msrs(&mut m) == Ok(1) {
                ok.push(index);
            }
        }
        Ok(ok)
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The VM file descriptor (for the dirty log).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The TSC frequency of the vCPUs in kHz.
    pub fn tsc_khz(&self) -> Result<u32> {
        let v = self.vcpus[0].lock().unwrap_or_else(|e| e.into_inner());
        v.get_tsc_khz().map_err(|source| VmError::Vcpu {
            op: "KVM_GET_TSC_KHZ",
            vcpu: 0,
            source,
        })
    }

    /// The serial port's output.
    pub fn serial(&self) -> &Arc<Serial> {
        &self.serial
    }

    /// Calls `f` with each vCPU's index and descriptor, e.g. to set its boot registers
    /// before [`Vm::start`]. The vCPUs must not be running.
    pub fn for_each_vcpu<E: From<VmError>>(
        &self,
        mut f: impl FnMut(u32, &VcpuFd) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        self.require_parked("configuring vCPUs")?;
        for (i, v) in self.vcpus.iter().enumerate() {
            f(i as u32, &v.lock().unwrap_or_else(|e| e.into_inner()))?;
        }
        Ok(())
    }

    /// Spawns the vCPU threads and lets them run.
    pub fn start(&mut self) -> Result<()> {
        self.start_paused()?;
        self.resume()
    }

    /// Spawns the vCPU threads (if not yet), which wait for [`Vm::resume`]: everything that
    /// can fail in starting a VM, without running it.
    pub fn start_paused(&mut self) -> Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.set_state(RunState::Paused);
        for (i, (v, &exit)) in self.vcpus.iter().zip(&self.exits).enumerate() {
            let v = Arc::clone(v);
            let control = Arc::clone(&self.control);
            let serial = Arc::clone(&self.serial);
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_loop(i as u32, &v, exit, &control, &serial))
                .map_err(|source| VmError::Spawn {
                    vcpu: i as u32,
                    source,
                })?;
            self.threads.push(h);
        }
        let control = Arc::clone(&self.control);
        let vcpus: Vec<libc::pthread_t> = {
            use std::os::unix::thread::JoinHandleExt;
            self.threads.iter().map(|t| t.as_pthread_t()).collect()
        };
        let ticker = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || throttle_ticker(&control, &vcpus))
            .map_err(|source| VmError::Spawn { vcpu: 0, source })?;
        self.ticker = Some(ticker);
        Ok(())
    }

    /// Takes the share `p` of vCPU time away (0 = none; clamped to [`MAX_THROTTLE`]).
    pub fn set_throttle(&self, p: f64) {
        let p = if p.is_finite() {
            p.clamp(0.0, MAX_THROTTLE)
        } else {
            0.0
        };
        self.control
            .throttle_ppm
            .store((p * 1e6).round() as u32, Ordering::Relaxed);
        // Wake the ticker (and any sleeping vCPU, which re-reads the throttle).
        let _st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        self.control.cv.notify_all();
    }

    /// The throttle in force.
    pub fn throttle(&self) -> f64 {
        self.control.throttle()
    }

    /// Packs every vCPU thread onto `cores` cores (the last ones the vCPU threads may use, so
    /// that workers pinned from the first core up keep theirs); `None` gives each thread its
    /// own affinity back. Returns the CPUs the vCPUs now share (`None`: their own affinity).
    pub fn overcommit(&self, cores: Option<usize>) -> Result<Option<Vec<usize>>> {
        use std::os::unix::thread::JoinHandleExt;
        let mut saved = self
            .saved_affinity
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(cores) = cores else {
            if let Some(orig) = saved.take() {
                for (t, cpus) in self.threads.iter().zip(&orig) {
                    crate::topo::set_thread_affinity(t.as_pthread_t(), cpus)
                        .map_err(VmError::Affinity)?;
                }
            }
            return Ok(None);
        };
        if saved.is_none() {
            let orig = self
                .threads
                .iter()
                .map(|t| crate::topo::thread_affinity(t.as_pthread_t()))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(VmError::Affinity)?;
            *saved = Some(orig);
        }
        let mut all: Vec<usize> = saved.iter().flatten().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        let keep = cores.clamp(1, all.len().max(1));
        let cpus = all.split_off(all.len().saturating_sub(keep));
        for t in &self.threads {
            crate::topo::set_thread_affinity(t.as_pthread_t(), &cpus).map_err(VmError::Affinity)?;
        }
        Ok(Some(cpus))
    }

    /// The CPUs each vCPU thread may run on now.
    pub fn vcpu_affinity(&self) -> Result<Vec<Vec<usize>>> {
        use std::os::unix::thread::JoinHandleExt;
        self.threads
            .iter()
            .map(|t| crate::topo::thread_affinity(t.as_pthread_t()).map_err(VmError::Affinity))
            .collect()
    }

    fn set_state(&self, s: RunState) {
        let mut st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = s;
        self.control.cv.notify_all();
    }

    /// CPU time the vCPU threads have used so far.
    pub fn vcpu_cpu_time(&self) -> Duration {
        use std::os::unix::thread::JoinHandleExt;
        self.threads
            .iter()
            .map(|t| crate::cpu::pthread_time(t.as_pthread_t()))
            .sum()
    }

    /// Whether the vCPUs are running.
    pub fn is_running(&self) -> bool {
        let st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 == RunState::Running && !self.threads.is_empty()
    }

    /// Stops every vCPU outside `KVM_RUN` and returns once all have parked.
    pub fn pause(&self) -> Result<()> {
        self.set_state(RunState::Paused);
        self.wait_parked();
        Ok(())
    }

    fn wait_parked(&self) {
        let n = self.threads.len();
        let mut st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.1 < n {
            drop(st);
            for &e in &self.exits {
                e.set(true);
            }
            for t in &self.threads {
                // A failed kick is retried on the next round.
                let _ = t.kill(kick_signal());
            }
            // The vCPUs may have parked (and notified no one) while we kicked: a plain wait
            // would then sleep its whole timeout in the downtime.
            st = self
                .control
                .cv
                .wait_timeout_while(
                    self.control.state.lock().unwrap_or_else(|e| e.into_inner()),
                    Duration::from_millis(2),
                    |st| st.1 < n,
                )
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<()> {
        self.set_state(RunState::Running);
        Ok(())
    }

    fn require_parked(&self, what: &'static str) -> Result<()> {
        let st = self.control.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 == RunState::Running && !self.threads.is_empty() {
            return Err(VmError::NotPaused(what));
        }
        Ok(())
    }

    /// Saves the state of every vCPU and of the VM (the vCPUs must be paused).
    pub fn save_state(&self) -> Result<VmState> {
        self.require_parked("saving VM state")?;
        let mut vcpus = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            vcpus.push(save_vcpu(&v, i as u32, &self.msr_indices)?);
        }
        let kvm = |op| move |source| VmError::Kvm { op, source };
        let clock = self.fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            vcpus,
            clock,
            irqchips,
        })
    }

    /// Restores a saved state into this (not yet started or paused) VM.
    pub fn restore_state(&self, s: &VmState) -> Result<()> {
        self.require_parked("restoring VM state")?;
        if s.vcpus.len() != self.vcpus.len() {
            return Err(VmError::StateShape {
                ours: self.vcpus.len(),
                theirs: s.vcpus.len(),
            });
        }
        let kvm = |op| move |source| VmError::Kvm { op, source };
        for chip in &s.irqchips {
            self.fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        let mut clock = s.clock;
        clock.flags = 0;
        self.fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for (i, (v, st)) in self.vcpus.iter().zip(&s.vcpus).enumerate() {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            restore_vcpu(&v, i as u32, st)?;
        }
        Ok(())
    }

    /// Stops and joins the vCPU threads. The VM cannot run again afterwards.
    pub fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.set_state(RunState::Stopped);
        self.wait_parked();
        if let Some(t) = self.ticker.take() {
            // The ticker only kicks; if it panicked there is nothing to clean up.
            let _ = t.join();
        }
        for t in self.threads.drain(..) {
            // A vCPU thread that panicked has nothing left to clean up.
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn save_vcpu(v: &VcpuFd, vcpu: u32, msr_indices: &[u32]) -> Result<VcpuState> {
    let e = |op| move |source| VmError::Vcpu { op, vcpu, source };
    let mut msrs = Msrs::from_entries(
        &msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .expect("MSR list fits");
    let n = v.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
    Ok(VcpuState {
        regs: v.get_regs().map_err(e("KVM_GET_REGS"))?,
        sregs: v.get_sregs().map_err(e("KVM_GET_SREGS"))?,
        xsave: v.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
        xcrs: v.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
        msrs: msrs.as_slice()[..n].to_vec(),
        lapic: v.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
        events: v.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        mp_state: v.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
        debugregs: v.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
    })
}

fn restore_vcpu(v: &VcpuFd, vcpu: u32, s: &VcpuState) -> Result<()> {
    let e = |op| move |source| VmError::Vcpu { op, vcpu, source };
    // Order follows what KVM expects: special registers (mode) before general ones, MSRs
    // after sregs (EFER), LAPIC before events, MP state last.
    v.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    v.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    // SAFETY: `s.xsave` is a full kvm_xsave as returned by KVM_GET_XSAVE on a vCPU with
    // the same CPUID (both sides use KVM's supported CPUID), so its size matches.
    unsafe { v.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    v.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VmError::Vcpu {
        op: "KVM_SET_MSRS",
        vcpu,
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    v.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
    v.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    v.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    v.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    v.set_mp_state(s.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// While a throttle is set, kicks every vCPU out of the guest once per [`THROTTLE_SLICE`];
/// otherwise waits. Returns when the VM stops. `vcpus` are threads joined only after this one.
fn throttle_ticker(control: &Control, vcpus: &[libc::pthread_t]) {
    loop {
        {
            let st = control.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.0 == RunState::Stopped {
                return;
            }
            if control.throttle() == 0.0 {
                // Woken by set_throttle or a state change.
                drop(control.cv.wait(st).unwrap_or_else(|e| e.into_inner()));
                continue;
            }
        }
        for &t in vcpus {
            // SAFETY: `t` is a vCPU thread of this process, joined only after this ticker
            // (Vm::shutdown), so its id is valid; the signal's handler does nothing.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
        std::thread::sleep(THROTTLE_SLICE);
    }
}

/// Sleeps the throttled share of the time the vCPU has run since `ran_since`, once it has run
/// a slice; returns early if the VM is paused or stopped meanwhile.
fn throttle_sleep(control: &Control, ran_since: &mut Instant) {
    let p = control.throttle();
    if p == 0.0 {
        *ran_since = Instant::now();
        return;
    }
    let ran = ran_since.elapsed();
    if ran < THROTTLE_SLICE {
        return;
    }
    let deadline = Instant::now() + ran.mul_f64(p / (1.0 - p));
    let mut st = control.state.lock().unwrap_or_else(|e| e.into_inner());
    while st.0 == RunState::Running && control.throttle() > 0.0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        st = control
            .cv
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    *ran_since = Instant::now();
}

fn vcpu_loop(index: u32, vcpu: &Mutex<VcpuFd>, exit: ExitFlag, control: &Control, serial: &Serial) {
    let mut line = Vec::<u8>::new();
    let mut ran_since = Instant::now();
    loop {
        throttle_sleep(control, &mut ran_since);
        {
            let mut st = control.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.0 != RunState::Running {
                st.1 += 1;
                control.cv.notify_all();
                while st.0 == RunState::Paused {
                    st = control.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.1 -= 1;
                if st.0 == RunState::Stopped {
                    st.1 += 1;
                    control.cv.notify_all();
                    return;
                }
            }
            // Running: a pause or stop changes the state under this lock before it sets the
            // flag, so this never clears the flag of its kick.
            exit.set(false);
        }
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        match v.run() {
            Ok(VcpuExit::IoOut(SERIAL_PORT, data)) => {
                for &b in data {
                    if b == b'\n' {
                        serial.line(&String::from_utf8_lossy(&line));
                        line.clear();
                    } else if line.len() < 4096 {
                        line.push(b);
                    }
                }
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                // Reads of absent ports see all ones; LSR (0x3fd) says "transmitter empty".
                data.fill(0xff);
            }
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::MmioRead(..)) | Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Intr) => {}
            Ok(exit) => {
                serial.line(&format!("ferry: vcpu{index} stopped on exit {exit:?}"));
                drop(v);
                let mut st = control.state.lock().unwrap_or_else(|e| e.into_inner());
                st.0 = RunState::Paused;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                serial.line(&format!("ferry: vcpu{index} KVM_RUN failed: {e}"));
                drop(v);
                let mut st = control.state.lock().unwrap_or_else(|e| e.into_inner());
                st.0 = RunState::Paused;
            }
        }
    }
}
