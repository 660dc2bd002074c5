//! Runs the guest program under real KVM. These tests need `/dev/kvm` (and fail, loudly, if
//! it is missing): a minimal runner with an in-kernel irqchip, one thread per vCPU, the
//! serial port collected per vCPU, and stops between runs so that memory can be tampered
//! with while the vCPUs are out of the guest.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::*;

const MIB: u64 = 1 << 20;
const COM1: u16 = 0x3f8;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 2
}

struct TestVm {
    _kvm: Kvm,
    _vm: VmFd,
    vcpus: Vec<VcpuFd>,
    mem: GuestMemory,
    layout: GuestLayout,
    /// Serial output of each vCPU.
    serial: Vec<Vec<u8>>,
}

impl TestVm {
    /// A VM of `mem_bytes` (in two memory slots) with the guest program installed.
    /// `scratch_sregs` boots from [`BootState::sregs`] instead of the vCPUs' own. The vCPUs
    /// get KVM's supported CPUID (as the micro-VM's do), unless `bare_cpuid`: then they
    /// have none, no x2APIC among it, and the guest spins instead of sleeping.
    fn new(mem_bytes: u64, p: GuestParams, scratch_sregs: bool, bare_cpuid: bool) -> Self {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| register_signal_handler(kick_signal(), kick_handler).unwrap());
        let kvm = Kvm::new().unwrap_or_else(|e| {
            panic!("this test runs the guest under KVM and needs /dev/kvm (as root): {e}")
        });
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mem = GuestMemory::new(&GuestMemory::simple_layout(mem_bytes, mem_bytes / 2)).unwrap();
        for (slot, r) in mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa(),
                memory_size: r.len(),
                userspace_addr: r.host_addr(),
            };
            // SAFETY: the region maps `r.len()` bytes at `r.host_addr()`; `mem` outlives the
            // VM (fields drop in order: vCPUs and VM before memory).
            unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        }
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        let vcpus: Vec<VcpuFd> = (0..p.vcpus)
            .map(|i| {
                let fd = vm.create_vcpu(i.into()).expect("KVM_CREATE_VCPU");
                if !bare_cpuid {
                    let mut c = cpuid.clone();
                    for e in c.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
                        e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24);
                    }
                    fd.set_cpuid2(&c).expect("KVM_SET_CPUID2");
                }
                fd
            })
            .collect();
        let tsc_khz = vcpus[0].get_tsc_khz().expect("KVM_GET_TSC_KHZ");
        let layout = install(&mem, &GuestParams { tsc_khz, ..p }).unwrap();
        for (i, fd) in vcpus.iter().enumerate() {
            let boot = layout.boot_state(i as u32);
            if scratch_sregs {
                fd.set_sregs(&boot.sregs()).unwrap();
                fd.set_regs(&boot.regs()).unwrap();
                let runnable = kvm_bindings::kvm_mp_state {
                    mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                };
                fd.set_mp_state(runnable).unwrap();
            } else {
                boot.configure(fd).unwrap();
            }
        }
        let serial = vec![Vec::new(); vcpus.len()];
        Self {
            _kvm: kvm,
            _vm: vm,
            vcpus,
            mem,
            layout,
            serial,
        }
    }

    /// Runs every vCPU for `d`, then kicks them out of the guest and waits for them.
    fn run_for(&mut self, d: Duration) {
        let stop = AtomicBool::new(false);
        let finished = AtomicUsize::new(0);
        let tids: Vec<AtomicU64> = self.vcpus.iter().map(|_| AtomicU64::new(0)).collect();
        let errors = thread::scope(|s| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(&mut self.serial)
                .zip(&tids)
                .enumerate()
                .map(|(i, ((fd, out), tid))| {
                    let (stop, finished) = (&stop, &finished);
                    s.spawn(move || {
                        // SAFETY: pthread_self has no preconditions.
                        tid.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
                        let r = run_vcpu(i, fd, out, stop);
                        finished.fetch_add(1, Ordering::SeqCst);
                        r
                    })
                })
                .collect();
            thread::sleep(d);
            stop.store(true, Ordering::SeqCst);
            // Kick until every thread is out: a kick that lands just before KVM_RUN is lost.
            while finished.load(Ordering::SeqCst) < handles.len() {
                for t in &tids {
                    let t = t.load(Ordering::SeqCst);
                    if t != 0 {
                        // SAFETY: `t` is a thread of this scope, alive until joined below.
                        unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
            handles
                .into_iter()
                .filter_map(|h| h.join().expect("vCPU thread").err())
                .collect::<Vec<_>>()
        });
        assert!(errors.is_empty(), "vCPU errors: {errors:?}");
    }

    fn lines(&self, vcpu: usize) -> Vec<String> {
        String::from_utf8_lossy(&self.serial[vcpu])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn bump_ledger(&self, page: u64) {
        let le = self.layout.ledger_entry_gpa(page);
        let mut c = [0u8; 4];
        self.mem.read(le, &mut c).unwrap();
        let c = u32::from_le_bytes(c) + 1;
        self.mem.write(le, &c.to_le_bytes()).unwrap();
    }
}

fn run_vcpu(i: usize, fd: &mut VcpuFd, out: &mut Vec<u8>, stop: &AtomicBool) -> Result<(), String> {
    while !stop.load(Ordering::SeqCst) {
        match fd.run() {
            Ok(VcpuExit::IoOut(COM1, data)) => out.extend_from_slice(data),
            Ok(exit) => {
                let exit = format!("{exit:?}");
                return Err(format!("vCPU {i}: exit {exit}, regs {:?}", fd.get_regs()));
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(format!("vCPU {i}: KVM_RUN: {e}")),
        }
    }
    Ok(())
}

/// Parses "vcpu N: writes W checks C fails F" into (N, W, C, F).
fn parse_report(line: &str) -> Option<(u64, u64, u64, u64)> {
    let w: Vec<&str> = line.split(' ').collect();
    match w[..] {
        ["vcpu", n, "writes", wr, "checks", c, "fails", f] => Some((
            n.strip_suffix(':')?.parse().ok()?,
            wr.parse().ok()?,
            c.parse().ok()?,
            f.parse().ok()?,
        )),
        _ => None,
    }
}

fn params(workload: Workload, vcpus: u32) -> GuestParams {
    GuestParams {
        workload,
        vcpus,
        fill: Fill::Mixed { seed: 9 },
        wss_bytes: 4 * MIB,
        report_interval_ms: 100,
        ..Default::default()
    }
}

/// Runs `workload` on `vcpus` vCPUs for 0.6 s and checks progress, reports and self-checks,
/// and that `idle` sleeps between its checks (unless `bare_cpuid`, without x2APIC).
fn runs_clean(workload: Workload, vcpus: u32, scratch_sregs: bool, bare_cpuid: bool) {
    let mut vm = TestVm::new(64 * MIB, params(workload, vcpus), scratch_sregs, bare_cpuid);
    let run = Duration::from_millis(600);
    let t = Instant::now();
    vm.run_for(run);
    let secs = t.elapsed().as_secs_f64();
    let st = status(&vm.mem).unwrap();
    for (i, s) in st.iter().enumerate() {
        eprintln!(
            "{workload} vcpus={vcpus} vcpu {i}: {:.0} writes/s, {:.0} checks/s, {s:?}",
            s.writes as f64 / secs,
            s.checks as f64 / secs
        );
        assert_eq!(s.fails, 0, "vCPU {i}: {:?}", vm.lines(i));
        if workload == Workload::Idle {
            assert_eq!(s.writes, 0);
            // 1000 checks/s by default.
            let most = 1000.0 * secs + 2.0;
            assert!(
                s.checks as f64 <= most && s.checks >= 100,
                "vCPU {i}: {s:?}"
            );
            // A 4 ms timer: about one wake-up per 4 checks.
            if bare_cpuid {
                assert_eq!(s.wakes, 0, "vCPU {i}: {s:?}");
            } else {
                assert!(s.wakes >= 10, "vCPU {i} did not sleep: {s:?}");
            }
        } else {
            // Not rate limited: no timer.
            assert_eq!(s.wakes, 0, "vCPU {i}: {s:?}");
            assert!(s.writes > 1000, "vCPU {i}: {s:?}");
            // A stop can fall between the two counter updates.
            assert!(s.writes.abs_diff(s.checks) <= 1, "vCPU {i}: {s:?}");
        }
        let lines = vm.lines(i);
        assert!(
            s.reports >= 2 && lines.len() as u64 >= s.reports,
            "vCPU {i}: {lines:?}"
        );
        let (n, w, c, f) = parse_report(&lines[0]).unwrap_or_else(|| panic!("{lines:?}"));
        assert_eq!((n, f), (i as u64, 0));
        assert!(w <= s.writes && c <= s.checks && c > 0);
    }
    let a = audit(&vm.mem).unwrap();
    assert!(a.is_clean(), "{a:?}");
    assert!(a.in_flight.len() <= vcpus as usize);
}

#[test]
fn idle_runs_under_kvm() {
    runs_clean(Workload::Idle, 1, false, false);
    runs_clean(Workload::Idle, 2, true, false);
    // Without x2APIC: spins as before.
    runs_clean(Workload::Idle, 1, false, true);
}

#[test]
fn dirty_all_runs_under_kvm() {
    runs_clean(Workload::DirtyAll, 1, false, false);
    runs_clean(Workload::DirtyAll, 2, false, false);
}

#[test]
fn seq_runs_under_kvm() {
    runs_clean(Workload::Seq, 1, true, false);
    runs_clean(Workload::Seq, 2, false, false);
}

#[test]
fn random_runs_under_kvm() {
    runs_clean(Workload::Random, 1, false, false);
    runs_clean(Workload::Random, 2, true, false);
}

#[test]
fn hotcold_runs_under_kvm() {
    runs_clean(Workload::HotCold, 1, false, false);
    runs_clean(Workload::HotCold, 2, false, false);
}

/// A ledger entry bumped while the VM is stopped is caught by the guest on its next visit.
#[test]
fn guest_detects_corruption() {
    for (workload, vcpus) in [(Workload::Seq, 2), (Workload::Idle, 1)] {
        let p = GuestParams {
            wss_bytes: 64 * 4096,
            // idle: sweep the whole share several times a second.
            rate_pages_per_s: if workload == Workload::Idle {
                100_000
            } else {
                0
            },
            ..params(workload, vcpus)
        };
        let mut vm = TestVm::new(64 * MIB, p, false, false);
        vm.run_for(Duration::from_millis(200));
        assert!(status(&vm.mem)
            .unwrap()
            .iter()
            .all(|s| s.fails == 0 && s.checks > 0));
        // A page the owner visits soon, and not the one it was stopped on (it would write
        // back the entry it had read): seq sweeps its 64 pages, idle all of its share, the
        // cursor at `checks` modulo their count.
        let owner = vcpus as usize - 1;
        let share = vm.layout.shares()[owner];
        let checks = status(&vm.mem).unwrap()[owner].checks;
        let ahead = match workload {
            Workload::Idle => (checks + 200) % share.pages,
            _ => (checks + 32) % 64,
        };
        let victim = share.first_page + ahead;
        vm.bump_ledger(victim);
        assert!(!audit(&vm.mem).unwrap().is_clean());
        vm.run_for(Duration::from_millis(400));
        let st = status(&vm.mem).unwrap();
        assert!(st[owner].fails > 0, "{workload}: {st:?}");
        let gfn = vm.layout.data_page_gpa(victim) >> 12;
        let want = format!("FAIL vcpu {owner} page {gfn}");
        assert!(vm.lines(owner).contains(&want), "{:?}", vm.lines(owner));
        if workload == Workload::Seq {
            // The guest rewrote the page, consistent again.
            assert_eq!(st[owner].fails, 1);
            assert!(audit(&vm.mem).unwrap().is_clean());
            assert_eq!(st[0].fails, 0);
        }
    }
}

/// At a rate limit, the guest keeps the rate, and does not burst to catch up after the VM
/// was stopped for a while (as during a migration).
#[test]
fn rate_limit_holds_across_a_stop() {
    let p = GuestParams {
        rate_pages_per_s: 2000,
        ..params(Workload::DirtyAll, 1)
    };
    let mut vm = TestVm::new(64 * MIB, p, false, false);
    // Writes expected at 2000/s while running for `secs` (the wall time of `run_for`, which
    // includes starting and kicking the threads, so a little more than the guest ran). On a
    // loaded host the vCPU thread may not get the CPU for a while and, by design, does not
    // catch up: the lower bound is loose.
    let expect = |writes: u64, secs: f64| {
        let max = 2000.0 * secs + 2.0;
        assert!(
            writes as f64 <= max && writes as f64 >= 0.2 * max,
            "{writes} writes in {secs:.3} s at 2000/s"
        );
    };
    let t = Instant::now();
    vm.run_for(Duration::from_millis(500));
    let first_secs = t.elapsed().as_secs_f64();
    let first = status(&vm.mem).unwrap()[0].writes;
    expect(first, first_secs);
    // Stopped for a second: a guest that caught up would burst 2000 writes.
    thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    vm.run_for(Duration::from_millis(300));
    let second_secs = t.elapsed().as_secs_f64();
    expect(status(&vm.mem).unwrap()[0].writes - first, second_secs);
    // One report per 100 ms of running; catching up would add ten more.
    let lines = vm.lines(0);
    let reports = lines.iter().filter_map(|l| parse_report(l)).count() as f64;
    let most = (first_secs + second_secs) * 10.0 + 1.0;
    assert!(reports >= 3.0 && reports <= most, "{lines:?}");
    // It waited asleep.
    assert!(status(&vm.mem).unwrap()[0].wakes > 0);
}

/// [`BootState::sregs`] (built without a vCPU) equals a fresh vCPU's own special registers
/// with [`BootState::apply_sregs`] applied.
#[test]
fn scratch_sregs_match_kvm_reset_state() {
    let kvm = Kvm::new().unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"));
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let layout = GuestLayout::new(64 * MIB, 2).unwrap();
    for i in 0..2u32 {
        let fd = vm.create_vcpu(i.into()).expect("KVM_CREATE_VCPU");
        let boot = layout.boot_state(i);
        let mut own = fd.get_sregs().unwrap();
        boot.apply_sregs(&mut own);
        assert_eq!(own, boot.sregs(), "vCPU {i}");
    }
}

/// Launches `vcpus` vCPUs of `idle` through [`crate::host::launch`] (the VMM's own VM).
fn launch_idle(vcpus: u32) -> crate::host::Launched {
    let spec = crate::host::GuestSpec {
        mem_bytes: 64 * MIB,
        region_bytes: 32 * MIB,
        guest: params(Workload::Idle, vcpus),
    };
    crate::host::launch(&spec, crate::vm::Serial::new(None, "")).expect("launching idle")
}

/// An idle guest sleeps between its checks: its vCPU thread uses little CPU.
#[test]
fn idle_guest_sleeps() {
    let l = launch_idle(1);
    thread::sleep(Duration::from_millis(200));
    let (cpu0, proc0, t0) = (
        l.vm.vcpu_cpu_time(),
        crate::cpu::process_time(),
        Instant::now(),
    );
    let checks0 = status(l.vm.memory()).unwrap()[0].checks;
    thread::sleep(Duration::from_secs(1));
    let (cpu, proc, wall) = (
        l.vm.vcpu_cpu_time() - cpu0,
        crate::cpu::process_time() - proc0,
        t0.elapsed(),
    );
    let s = status(l.vm.memory()).unwrap()[0];
    eprintln!(
        "idle vCPU: {:.3} s CPU (process {:.3} s) in {:.3} s, {} checks",
        cpu.as_secs_f64(),
        proc.as_secs_f64(),
        wall.as_secs_f64(),
        s.checks - checks0
    );
    assert_eq!(s.fails, 0, "{s:?}");
    assert!(s.checks - checks0 >= 200, "{checks0} -> {s:?}");
    assert!(cpu < wall / 4, "idle vCPU used {cpu:?} of CPU in {wall:?}");
}

/// A sleeping idle guest moved to a fresh VM (pause, save, copy memory, restore, start, as
/// a migration does) keeps waking on its timer and checking pages.
#[test]
fn idle_guest_keeps_sleeping_after_restore() {
    use crate::vm::{Serial, Vm, VmState};
    let vcpus = 2;
    let src = launch_idle(vcpus);
    thread::sleep(Duration::from_millis(500));
    // Save it with a vCPU asleep in `hlt` (MP state HALTED), as it nearly always is.
    let mut halted = 0;
    for _ in 0..20 {
        src.vm.pause().unwrap();
        src.vm
            .for_each_vcpu(|_, fd| {
                let mp = fd.get_mp_state().map_err(|e| crate::vm::VmError::Kvm {
                    op: "KVM_GET_MP_STATE",
                    source: e,
                })?;
                halted += u32::from(mp.mp_state == kvm_bindings::KVM_MP_STATE_HALTED);
                Ok::<_, crate::vm::VmError>(())
            })
            .unwrap();
        if halted > 0 {
            break;
        }
        src.vm.resume().unwrap();
        thread::sleep(Duration::from_millis(7));
    }
    assert!(halted > 0, "no vCPU was ever halted when paused");
    let before = status(src.vm.memory()).unwrap();
    assert!(
        before.iter().all(|s| s.checks > 0 && s.wakes > 0),
        "{before:?}"
    );
    let state = VmState::from_bytes(&src.vm.save_state().unwrap().to_bytes()).unwrap();
    let serial = Serial::new(None, "");
    let mut dst = Vm::new(&src.vm.memory().layout(), vcpus, serial.clone()).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    for gpa in (0..src.vm.memory().size()).step_by(PAGE_SIZE) {
        src.vm.memory().read(gpa, &mut page).unwrap();
        dst.memory().write(gpa, &page).unwrap();
    }
    drop(src);
    dst.restore_state(&state).unwrap();
    dst.start().unwrap();
    let t = Instant::now();
    thread::sleep(Duration::from_millis(500));
    let cpu = dst.vcpu_cpu_time();
    dst.pause().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let after = status(dst.memory()).unwrap();
    eprintln!(
        "restored idle: {before:?} -> {after:?} in {secs:.3} s, {:.3} s vCPU CPU",
        cpu.as_secs_f64()
    );
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(a.fails, 0, "{after:?}");
        // 1000 checks/s: at least a fifth of that on a busy host.
        assert!(
            a.checks >= b.checks + 100 && a.wakes >= b.wakes + 20,
            "guest did not continue: {before:?} -> {after:?}"
        );
    }
    assert!(audit(dst.memory()).unwrap().is_clean());
    assert!(
        serial.recent().iter().any(|l| l.ends_with("fails 0")),
        "no reports on the new VM: {:?}",
        serial.recent()
    );
    assert!(
        cpu < Duration::from_millis(250) * vcpus,
        "restored idle vCPUs used {cpu:?} of CPU in {secs:.3} s"
    );
}
