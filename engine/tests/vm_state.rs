//! Micro-VM integration tests: real KVM (needs /dev/kvm and root; fails loudly without).

use std::time::Duration;

use ferry_engine::bitmap::Bitmap;
use ferry_engine::dirty::DirtyTracker;
use ferry_engine::guest::{self, Fill, GuestParams, Workload};
use ferry_engine::host::{self, GuestSpec};
use ferry_engine::memory::PAGE_SIZE;
use ferry_engine::vm::{Serial, Vm, VmState};

fn require_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (KVM) and root; they do not skip"
    );
}

fn spec(workload: Workload, vcpus: u32) -> GuestSpec {
    GuestSpec {
        mem_bytes: 64 << 20,
        region_bytes: 32 << 20,
        guest: GuestParams {
            workload,
            vcpus,
            fill: Fill::Mixed { seed: 7 },
            report_interval_ms: 200,
            ..GuestParams::default()
        },
    }
}

/// Pause, save, copy memory into a fresh VM in the same process, restore, resume: the guest
/// continues where it was with its self-check intact.
#[test]
fn state_moves_to_a_fresh_vm() {
    require_kvm();
    let src = host::launch(&spec(Workload::Random, 2), Serial::new(None, "")).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    src.vm.pause().unwrap();
    let before = guest::status(src.vm.memory()).unwrap();
    assert!(
        before.iter().all(|s| s.writes > 0),
        "guest made no progress: {before:?}"
    );
    let state = VmState::from_bytes(&src.vm.save_state().unwrap().to_bytes()).unwrap();

    let serial = Serial::new(None, "");
    let mut dst = Vm::new(&src.vm.memory().layout(), 2, serial.clone()).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    for gpa in (0..src.vm.memory().size()).step_by(PAGE_SIZE) {
        src.vm.memory().read(gpa, &mut page).unwrap();
        dst.memory().write(gpa, &page).unwrap();
    }
    dst.restore_state(&state).unwrap();
    dst.start().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    dst.pause().unwrap();
    let after = guest::status(dst.memory()).unwrap();
    for (a, b) in after.iter().zip(&before) {
        assert!(
            a.writes > b.writes,
            "guest did not continue: {before:?} -> {after:?}"
        );
        assert_eq!(a.fails, 0, "self-check failed after restore: {after:?}");
    }
    assert!(guest::audit(dst.memory()).unwrap().bad_pages == 0);
    assert!(
        serial.recent().iter().any(|l| l.contains("writes")),
        "no serial output on the new VM: {:?}",
        serial.recent()
    );
}

/// The dirty log reports pages the guest writes, and clearing re-arms it.
#[test]
fn dirty_log_sees_guest_writes() {
    require_kvm();
    let l = host::launch(&spec(Workload::Seq, 1), Serial::new(None, "")).unwrap();
    let span = l.vm.memory().page_span();
    let mut all: Vec<u64> = (0..span).collect();
    // Initially every page is dirty (manual protect, initially set).
    let mut b = Bitmap::new(span);
    l.tracker.harvest(&mut b).unwrap();
    assert_eq!(b.count(), span);
    l.tracker.clear(&all).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    l.vm.pause().unwrap();
    let mut b = Bitmap::new(span);
    l.tracker.harvest(&mut b).unwrap();
    let n = b.count();
    assert!(n > 10 && n < span, "dirty pages after clear: {n} of {span}");
    // A peek sees the same pages and resets none: a second one sees them again.
    for _ in 0..2 {
        let mut peeked = Bitmap::new(span);
        l.tracker.peek(&mut peeked).unwrap();
        assert_eq!(peeked.words(), b.words());
    }
    // With the VM paused, a clear leaves nothing dirty.
    all.retain(|&p| b.get(p));
    l.tracker.clear(&all).unwrap();
    let mut b2 = Bitmap::new(span);
    l.tracker.harvest(&mut b2).unwrap();
    assert_eq!(b2.count(), 0);
    // VMM writes are merged by a harvest, and left for it by a peek.
    l.vmm_dirty.mark(0x5000, 1);
    l.tracker.peek(&mut b2).unwrap();
    assert_eq!(b2.count(), 0);
    l.tracker.harvest(&mut b2).unwrap();
    assert_eq!(b2.iter_ones().collect::<Vec<_>>(), vec![5]);
}

/// Guest writes so far (sum over vCPUs), read from the guest's own counters.
fn writes(vm: &Vm) -> u64 {
    guest::status(vm.memory())
        .unwrap()
        .iter()
        .map(|s| s.writes)
        .sum()
}

/// Guest writes during `window`.
fn writes_during(vm: &Vm, window: Duration) -> u64 {
    let before = writes(vm);
    std::thread::sleep(window);
    writes(vm) - before
}

/// A 75% throttle takes most of the vCPU's time away (the guest writes far fewer pages), and
/// lifting it gives the time back; pausing a throttled VM does not wait out its sleep.
#[test]
fn throttle_slows_the_guest_and_lifts() {
    require_kvm();
    let spec = spec(Workload::Seq, 1);
    let l = host::launch(&spec, Serial::new(None, "")).unwrap();
    // Past the guest's first pass over its memory (at most a write a page): on this project's
    // PVM hosts the first touch of each page runs at a fraction of the later passes' speed,
    // and a free window within it once wrote 11 065 pages against 41 538 after the throttle.
    let pages = spec.mem_bytes / PAGE_SIZE as u64;
    let t = std::time::Instant::now();
    while writes(&l.vm) < pages && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let window = Duration::from_millis(600);
    let free = writes_during(&l.vm, window);
    l.vm.set_throttle(0.75);
    assert_eq!(l.vm.throttle(), 0.75);
    std::thread::sleep(Duration::from_millis(100));
    let throttled = writes_during(&l.vm, window);
    l.vm.set_throttle(0.0);
    std::thread::sleep(Duration::from_millis(100));
    let again = writes_during(&l.vm, window);
    eprintln!("writes per window: {free} free, {throttled} throttled, {again} after");
    assert!(free > 0 && again > 0, "guest made no progress");
    // Expected ratio 0.25; allow for a noisy shared machine.
    assert!(
        (throttled as f64) < 0.6 * free as f64 && (throttled as f64) < 0.6 * again as f64,
        "throttle had no effect: {free} free, {throttled} throttled, {again} after"
    );
    l.vm.set_throttle(0.99);
    std::thread::sleep(Duration::from_millis(50));
    let t = std::time::Instant::now();
    l.vm.pause().unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "pause waited out the throttle sleep: {:?}",
        t.elapsed()
    );
}

/// Over-commit packs every vCPU thread onto the requested number of cores and puts each
/// thread's own affinity back.
#[test]
fn overcommit_packs_and_restores_vcpu_affinity() {
    require_kvm();
    let l = host::launch(&spec(Workload::Random, 2), Serial::new(None, "")).unwrap();
    let before = l.vm.vcpu_affinity().unwrap();
    assert_eq!(before.len(), 2);
    let cpus = l.vm.overcommit(Some(1)).unwrap().expect("over-committed");
    assert_eq!(cpus.len(), 1);
    assert!(before[0].contains(&cpus[0]));
    assert_eq!(
        l.vm.vcpu_affinity().unwrap(),
        vec![cpus.clone(), cpus.clone()]
    );
    // Asking again keeps the saved originals (it does not save the packed set).
    l.vm.overcommit(Some(1)).unwrap();
    assert_eq!(l.vm.overcommit(None).unwrap(), None);
    assert_eq!(l.vm.vcpu_affinity().unwrap(), before);
    // Restoring twice is harmless.
    l.vm.overcommit(None).unwrap();
    assert_eq!(l.vm.vcpu_affinity().unwrap(), before);
    assert!(writes_during(&l.vm, Duration::from_millis(200)) > 0);
}
