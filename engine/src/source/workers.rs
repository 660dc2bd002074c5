//! The source's range workers: threads that take work items (a list of pages and the epoch
//! they are read in), re-arm those pages' dirty bits, read and encode them, and hand full
//! batches to the transport. The coordinator thread only decides and dispatches; it never
//! touches page contents.
//!
//! Work goes through one bounded queue per NUMA node (backpressure onto the coordinator);
//! a worker takes from its own node's queue first and steals from the others when it runs
//! dry, so unequal nodes and idle workers never leave work waiting.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ferry_transport::SessionSender;

use super::pace::Pacer;
use super::{Fault, MigrateError};
use crate::cpu;
use crate::digest::LiveTerms;
use crate::dirty::DirtyTracker;
use crate::encode::{BatchEncoder, BatchStats, Codec, EncoderConfig};
use crate::memory::{PAGE_SHIFT, PAGE_SIZE};
use crate::proto::Tag;
use crate::vm::Vm;

/// Pages to send, all read in harvest `epoch`.
pub(super) struct Work {
    pub pages: Vec<u64>,
    pub epoch: u32,
}

/// What the workers share with the coordinator.
pub(super) struct Shared<'a> {
    pub vm: &'a Vm,
    pub tracker: &'a dyn DirtyTracker,
    pub tx: &'a SessionSender,
    pub encoder: EncoderConfig,
    /// The codec (the coordinator's choice, read per work item; [`Codec::to_u8`]).
    pub codec: AtomicU8,
    pub wire_bytes: AtomicU64,
    /// Pages encoded so far (the pages behind `wire_bytes`).
    pub encoded_pages: AtomicU64,
    pub stats: Mutex<BatchStats>,
    /// The `--max-bandwidth` cap.
    pub pacer: Pacer,
    /// CPU time the workers used, in nanoseconds (added as each worker ends).
    pub cpu_ns: AtomicU64,
    /// The source's page terms for `--verify full`, marked stale as pages are re-armed.
    pub live_terms: Option<&'a LiveTerms>,
    outstanding: Mutex<usize>,
    idle: Condvar,
    error: Mutex<Option<MigrateError>>,
    failed: AtomicBool,
    fault: Mutex<Option<Fault>>,
    corrupt_next: AtomicBool,
    drop_next: AtomicBool,
}

impl<'a> Shared<'a> {
    pub fn new(
        vm: &'a Vm,
        tracker: &'a dyn DirtyTracker,
        tx: &'a SessionSender,
        encoder: EncoderConfig,
        fault: Option<Fault>,
        max_bandwidth: Option<f64>,
        live_terms: Option<&'a LiveTerms>,
    ) -> Self {
        Self {
            vm,
            tracker,
            tx,
            codec: AtomicU8::new(encoder.codec.to_u8()),
            encoder,
            wire_bytes: AtomicU64::new(0),
            encoded_pages: AtomicU64::new(0),
            stats: Mutex::new(BatchStats::default()),
            pacer: Pacer::new(max_bandwidth),
            cpu_ns: AtomicU64::new(0),
            live_terms,
            outstanding: Mutex::new(0),
            idle: Condvar::new(),
            error: Mutex::new(None),
            failed: AtomicBool::new(false),
            fault: Mutex::new(fault.filter(|f| !matches!(f, Fault::CorruptPage | Fault::DropPage))),
            corrupt_next: AtomicBool::new(false),
            drop_next: AtomicBool::new(fault == Some(Fault::DropPage)),
        }
    }

    /// Makes the next page read carry one wrong byte (for the digest-mismatch test).
    pub fn corrupt_next_page(&self) {
        self.corrupt_next.store(true, Ordering::SeqCst);
    }

    /// The first error a worker hit, if any (taken: reported once).
    pub fn take_error(&self) -> Option<MigrateError> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn fail(&self, e: MigrateError) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() && !self.failed.load(Ordering::Acquire) {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::Release);
    }

    fn done_one(&self) {
        let mut n = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }
}

/// The coordinator's handle on the worker queues.
pub(super) struct Dispatch<'a, 's> {
    shared: &'s Shared<'a>,
    queues: Vec<Sender<Work>>,
}

impl<'a, 's> Dispatch<'a, 's> {
    /// Queues `work` for the workers of `node`; blocks while that queue is full.
    pub fn send(&self, node: usize, work: Work) -> Result<(), MigrateError> {
        if let Some(e) = self.shared.take_error() {
            return Err(e);
        }
        *self
            .shared
            .outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        if self.queues[node % self.queues.len()].send(work).is_err() {
            self.shared.done_one();
            return Err(MigrateError::Workers("every worker has stopped".into()));
        }
        Ok(())
    }

    /// Waits until every queued work item is sent (handed to the transport), then reports
    /// the first worker error, if any.
    pub fn drain(&self) -> Result<(), MigrateError> {
        let mut n = self
            .shared
            .outstanding
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self
                .shared
                .idle
                .wait_timeout(n, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(n);
        match self.shared.take_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Starts `cpus.len()` workers in `scope`, worker `i` pinned to `cpus[i]` (if given) and
/// serving the queue of `nodes[i]` first. Returns the coordinator's dispatch handle; the
/// workers end when it is dropped. A worker that cannot be started fails the migration
/// before anything is sent (those started end as their queues close).
pub(super) fn start<'scope, 'env, 'a>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    shared: &'env Shared<'a>,
    cpus: &[Option<usize>],
    nodes: &[usize],
) -> std::io::Result<Dispatch<'a, 'env>>
where
    'a: 'env,
{
    let n_nodes = nodes.iter().copied().max().unwrap_or(0) + 1;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n_nodes)
        .map(|_| crossbeam_channel::bounded::<Work>(2 * cpus.len().max(1)))
        .unzip();
    for (i, &cpu) in cpus.iter().enumerate() {
        let node = nodes.get(i).copied().unwrap_or(0);
        // Own queue first, then the others in order: stealing.
        let mut order: Vec<Receiver<Work>> = vec![rxs[node].clone()];
        order.extend(
            rxs.iter()
                .enumerate()
                .filter(|(j, _)| *j != node)
                .map(|(_, r)| r.clone()),
        );
        std::thread::Builder::new()
            .name(format!("ferry-worker{i}"))
            .spawn_scoped(scope, move || {
                if let Some(c) = cpu {
                    // Pinning is an optimisation; an unpinned worker still works.
                    let _ = core_affinity::set_for_current(core_affinity::CoreId { id: c });
                }
                run(shared, &order);
            })?;
    }
    Ok(Dispatch {
        shared,
        queues: txs,
    })
}

fn next(order: &[Receiver<Work>]) -> Option<Work> {
    loop {
        let mut all_closed = true;
        for r in order {
            match r.try_recv() {
                Ok(w) => return Some(w),
                Err(TryRecvError::Empty) => all_closed = false,
                Err(TryRecvError::Disconnected) => {}
            }
        }
        if all_closed {
            return None;
        }
        // Nothing anywhere: block on our own queue for a while, then look again.
        match order[0].recv_timeout(Duration::from_millis(5)) {
            Ok(w) => return Some(w),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                if order.len() == 1 {
                    return None;
                }
            }
        }
    }
}

fn run(shared: &Shared<'_>, order: &[Receiver<Work>]) {
    let mut enc = BatchEncoder::new(shared.encoder.clone());
    let mut buf = vec![0u8; PAGE_SIZE];
    while let Some(work) = next(order) {
        if !shared.failed.load(Ordering::Acquire) {
            if let Err(e) = process(shared, &mut enc, &mut buf, &work) {
                shared.fail(e);
            }
        }
        shared.done_one();
    }
    shared
        .cpu_ns
        .fetch_add(cpu::thread_time().as_nanos() as u64, Ordering::Relaxed);
}

/// Re-arms, reads, encodes and sends the pages of one work item.
fn process(
    shared: &Shared<'_>,
    enc: &mut BatchEncoder,
    buf: &mut [u8],
    work: &Work,
) -> Result<(), MigrateError> {
    shared.tracker.clear(&work.pages)?;
    if let Some(t) = shared.live_terms {
        t.mark(&work.pages);
    }
    enc.set_codec(Codec::from_u8(shared.codec.load(Ordering::Relaxed)));
    let mem = shared.vm.memory();
    for &p in &work.pages {
        let gpa = p << PAGE_SHIFT;
        mem.read(gpa, buf)?;
        if shared.corrupt_next.swap(false, Ordering::SeqCst) {
            buf[100] ^= 0x5a;
        }
        if shared.drop_next.load(Ordering::Relaxed)
            && buf.iter().any(|&b| b != 0)
            && shared.drop_next.swap(false, Ordering::SeqCst)
        {
            continue;
        }
        let page: &[u8; PAGE_SIZE] = (&*buf).try_into().expect("one page");
        enc.push(gpa, work.epoch, page)?;
        if enc.is_full() {
            flush(shared, enc, work.epoch)?;
        }
    }
    flush(shared, enc, work.epoch)
}

fn flush(shared: &Shared<'_>, enc: &mut BatchEncoder, epoch: u32) -> Result<(), MigrateError> {
    if enc.is_empty() {
        return Ok(());
    }
    let (payload, stats) = enc.finish();
    shared
        .encoded_pages
        .fetch_add(stats.pages(), Ordering::Relaxed);
    shared
        .wire_bytes
        .fetch_add(payload.len() as u64, Ordering::Relaxed);
    *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) += stats;
    let fault = shared
        .fault
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(f) = fault {
        inject(shared, f, &payload, epoch)?;
    }
    shared.pacer.pace(payload.len() as u64);
    shared.tx.send(Tag::Pages as u16, payload)?;
    Ok(())
}

/// Sends one bad batch, for the faults that need one.
fn inject(shared: &Shared<'_>, f: Fault, payload: &[u8], epoch: u32) -> Result<(), MigrateError> {
    match f {
        Fault::GpaOutsideMemory => {
            let mut e = BatchEncoder::new(shared.encoder.clone());
            let outside = shared.vm.memory().page_span() << PAGE_SHIFT;
            e.push(outside + (1 << 30), epoch, &[0x42; PAGE_SIZE])?;
            shared.tx.send(Tag::Pages as u16, e.finish().0)?;
        }
        Fault::TruncatedBatch => {
            let cut = payload.len() / 2;
            shared.tx.send(Tag::Pages as u16, payload[..cut].to_vec())?;
        }
        Fault::CorruptPage | Fault::DropPage => {}
    }
    Ok(())
}
