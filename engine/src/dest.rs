//! The destination side: receive a VM, write its pages, compare digests, resume it.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> AwaitDescribe
//!     AwaitDescribe --> Receiving: Describe / build VM, reply Ready
//!     Receiving --> Receiving: Pages (validated, newest epoch wins) / Probe
//!     Receiving --> AwaitCommit: Switchover / restore state, reply Digests
//!     AwaitCommit --> [*]: Commit / resume VM, reply Resumed
//!     Receiving --> Failed: bad batch, unexpected message, Abort
//!     AwaitCommit --> Failed: Abort
//! ```
//! Every page record is validated (address, length, class) for the whole batch before any
//! byte of it is written; a bad batch writes nothing, is reported to the source as `Failed`
//! with the reason, and ends the migration here. The source then resumes its VM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_transport::{Incoming, SessionReceiver};

use crate::cpu;
use crate::digest::{self, PageTerms, VerifyMode};
use crate::encode::{is_zero_page, BatchDecoder, DecodeError};
use crate::memory::{GuestMemory, MemoryError, PAGE_SHIFT, PAGE_SIZE};
use crate::proto::{self, Describe, DestFigures, Digests, ProtoError, Tag};
use crate::vm::{Serial, Vm, VmError, VmState};

/// Tuning of the destination side.
#[derive(Clone, Debug)]
pub struct DestConfig {
    /// Threads hashing at switchover (default: available cores).
    pub digest_threads: usize,
    /// Longest silence from the source before giving up (default 60 s).
    pub idle_timeout: Duration,
    /// Threads that decode and write page batches (default: available cores).
    pub workers: usize,
    /// Cores the decode threads are pinned to, round robin (default: the cores this
    /// process may run on; empty: unpinned).
    pub cpus: Vec<usize>,
    /// Allocate all of guest memory before the source sends a page (default: yes; see
    /// [`GuestMemory::populate`]). Without, a page is allocated when it first arrives, and
    /// zero pages never are.
    pub prealloc: bool,
}

impl Default for DestConfig {
    fn default() -> Self {
        Self {
            digest_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            idle_timeout: Duration::from_secs(60),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cpus: crate::topo::current_affinity().unwrap_or_default(),
            prealloc: true,
        }
    }
}

/// Why receiving a VM failed. Nothing was resumed here; the source keeps its VM.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("transport failed")]
    Transport(#[from] ferry_transport::Error),
    #[error("protocol error")]
    Proto(#[from] ProtoError),
    #[error("rejected a page batch (seq {seq})")]
    Batch {
        seq: u64,
        #[source]
        source: DecodeError,
    },
    #[error("the source aborted: {0}")]
    SourceAborted(String),
    #[error("VM operation failed")]
    Vm(#[from] VmError),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("malformed VM state")]
    State(#[source] bincode::Error),
    #[error("starting the decode threads")]
    Spawn(#[source] std::io::Error),
}

/// How often the receiving loop looks at the decode threads' errors while waiting.
const APPLIER_POLL: Duration = Duration::from_millis(100);

/// What the destination measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DestReport {
    pub batches: u64,
    pub pages_written: u64,
    /// Records dropped because a newer epoch of the page had already arrived.
    pub stale_records: u64,
    pub hash_ms: f64,
    /// CPU seconds this process spent receiving.
    pub cpu_s: f64,
    /// Allocating guest memory before the first page ([`DestConfig::prealloc`]).
    pub prealloc_ms: Option<f64>,
}

/// The states of the receiver (see the module diagram).
enum State {
    AwaitDescribe,
    Receiving {
        vm: Arc<Vm>,
        pages: Arc<PageVersions>,
    },
    AwaitCommit {
        vm: Arc<Vm>,
    },
}

/// The newest epoch written to each page, with striped locks so that two records of the
/// same page applied on two threads cannot interleave (DESIGN §4.1), and each page's digest
/// term as written.
struct PageVersions {
    /// Epoch + 1 of the newest record written (0: none yet).
    epochs: Vec<AtomicU32>,
    stripes: Vec<Mutex<()>>,
    terms: PageTerms,
}

impl PageVersions {
    const STRIPES: usize = 1024;

    fn new(pages: u64) -> Self {
        Self {
            epochs: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            stripes: (0..Self::STRIPES).map(|_| Mutex::new(())).collect(),
            terms: PageTerms::new(pages),
        }
    }

    /// Writes `page` unless a newer epoch of it is already there; returns whether it wrote.
    fn apply(
        &self,
        mem: &GuestMemory,
        gpa: u64,
        epoch: u32,
        page: &[u8; PAGE_SIZE],
    ) -> Result<bool, MemoryError> {
        let p = (gpa >> PAGE_SHIFT) as usize;
        let _g = self.stripes[p % Self::STRIPES]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let slot = &self.epochs[p];
        let newest = slot.load(Ordering::Relaxed);
        if epoch + 1 < newest {
            return Ok(false);
        }
        // A page never written here is still zero (fresh memory): writing zeros would only
        // fault it in, and its digest term is already that of a zero page.
        if newest != 0 || !is_zero_page(page) {
            mem.write(gpa, page)?;
            self.terms.set(p as u64, page);
        }
        slot.store(epoch + 1, Ordering::Relaxed);
        Ok(true)
    }
}

/// A page batch to apply, with what it is applied to.
type Job = (Arc<Vm>, Arc<PageVersions>, Incoming);

/// Decode workers: page batches are decoded, written and acknowledged on several threads.
struct Appliers {
    queue: Option<crossbeam_channel::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    error: Arc<Mutex<Option<ReceiveError>>>,
    counts: Arc<Mutex<DestReport>>,
}

impl Appliers {
    /// Starts `n` decode threads, thread `i` pinned to `cpus[i % cpus.len()]` if any. If one
    /// cannot be started, those that were end as the queue closes.
    fn start(rx: &Arc<SessionReceiver>, n: usize, cpus: &[usize]) -> std::io::Result<Self> {
        let (tx, queue) = crossbeam_channel::bounded::<Job>(2 * n);
        let error = Arc::new(Mutex::new(None));
        let counts = Arc::new(Mutex::new(DestReport::default()));
        let threads = (0..n.max(1))
            .map(|i| {
                let (queue, error, counts, rx) = (
                    queue.clone(),
                    Arc::clone(&error),
                    Arc::clone(&counts),
                    Arc::clone(rx),
                );
                let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
                std::thread::Builder::new()
                    .name(format!("ferry-apply{i}"))
                    .spawn(move || {
                        if let Some(c) = cpu {
                            // Pinning is an optimisation; an unpinned decoder still works.
                            let _ = crate::topo::pin_current_thread(c);
                        }
                        let mut dec = BatchDecoder::new();
                        for (vm, pages, msg) in queue {
                            let r = apply_batch(&mut dec, &vm, &pages, &msg).and_then(|(w, s)| {
                                rx.ack(&msg)?;
                                Ok((w, s))
                            });
                            match r {
                                Ok((written, stale)) => {
                                    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                                    c.batches += 1;
                                    c.pages_written += written;
                                    c.stale_records += stale;
                                }
                                Err(e) => {
                                    let mut slot = error.lock().unwrap_or_else(|e| e.into_inner());
                                    slot.get_or_insert(e);
                                }
                            }
                        }
                    })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self {
            queue: Some(tx),
            threads,
            error,
            counts,
        })
    }

    /// Closes the queue and waits for the decode threads to finish what they hold.
    fn stop(&mut self) {
        self.queue.take();
        for t in self.threads.drain(..) {
            // A decode thread that panicked has nothing left to clean up.
            let _ = t.join();
        }
    }

    fn check(&self) -> Result<(), ReceiveError> {
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Appliers {
    fn drop(&mut self) {
        self.stop();
    }
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::AwaitDescribe => "before Describe",
            Self::Receiving { .. } => "while receiving pages",
            Self::AwaitCommit { .. } => "while awaiting Commit",
        }
    }
}

/// Receives one VM over `rx` and returns it running, with what was measured.
pub fn receive(
    rx: &Arc<SessionReceiver>,
    serial: Arc<Serial>,
    cfg: &DestConfig,
) -> Result<(Vm, DestReport), ReceiveError> {
    let mut report = DestReport::default();
    let result = run(rx, serial, cfg, &mut report);
    if let Err(e) = &result {
        // Tell the source why, so it rolls back at once; it may already be gone.
        let _ = rx.reply(Tag::Failed as u16, error_chain(e).as_bytes());
    }
    result.map(|vm| (vm, report))
}

/// "outer: inner: innermost" for an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn run(
    rx: &Arc<SessionReceiver>,
    serial: Arc<Serial>,
    cfg: &DestConfig,
    report: &mut DestReport,
) -> Result<Vm, ReceiveError> {
    let mut state = State::AwaitDescribe;
    let mut serial = Some(serial);
    let mut appliers = Appliers::start(rx, cfg.workers, &cfg.cpus).map_err(ReceiveError::Spawn)?;
    let cpu0 = cpu::process_time();
    let mut idle = Duration::ZERO;
    loop {
        appliers.check()?;
        let msg: Incoming = match rx.recv(APPLIER_POLL) {
            Ok(m) => {
                idle = Duration::ZERO;
                m
            }
            Err(e) if e.is_timeout() && idle < cfg.idle_timeout => {
                idle += APPLIER_POLL;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let tag = Tag::from_u16(msg.tag).ok_or(ProtoError::UnknownTag(msg.tag))?;
        state = match (state, tag) {
            (_, Tag::Abort) => {
                return Err(ReceiveError::SourceAborted(
                    String::from_utf8_lossy(&msg.payload).into(),
                ))
            }
            (State::AwaitDescribe, Tag::Describe) => {
                let d: Describe = proto::from_json("Describe", &msg.payload)?;
                let mut vm = Vm::new(
                    &d.layout,
                    d.vcpus,
                    serial.take().expect("Describe is accepted once"),
                )?;
                if cfg.prealloc {
                    let t = Instant::now();
                    vm.memory().populate(cfg.workers)?;
                    report.prealloc_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                }
                // The vCPU threads are created now, parked (what can fail, before a page is
                // sent), not in the downtime; they run only once the Commit is answered.
                vm.start_paused()?;
                let pages = Arc::new(PageVersions::new(vm.memory().page_span()));
                rx.ack(&msg)?;
                let ready = proto::Ready {
                    prealloc_ms: report.prealloc_ms,
                };
                rx.reply_to(&msg, Tag::Ready as u16, &proto::to_json(&ready))?;
                State::Receiving {
                    vm: Arc::new(vm),
                    pages,
                }
            }
            (s @ State::Receiving { .. }, Tag::Probe) => {
                rx.ack(&msg)?;
                s
            }
            (State::Receiving { vm, pages }, Tag::Pages) => {
                let q = appliers.queue.as_ref().expect("open until drop");
                if q.send((Arc::clone(&vm), Arc::clone(&pages), msg)).is_err() {
                    appliers.check()?;
                }
                State::Receiving { vm, pages }
            }
            (State::Receiving { vm, pages }, Tag::Switchover) => {
                let (h, state_bytes) = proto::decode_switchover(&msg.payload)?;
                let st = VmState::from_bytes(state_bytes).map_err(ReceiveError::State)?;
                vm.restore_state(&st)?;
                rx.ack(&msg)?;
                let t = Instant::now();
                let (mem, threads) = (vm.memory(), cfg.digest_threads);
                let digests = match h.verify {
                    // SAFETY: the VM has not started, and the source's barrier before
                    // Switchover means every page batch has been applied and acknowledged.
                    VerifyMode::Reread => unsafe {
                        digest::digests(mem, h.verify, h.digest_range, h.salt, threads)?
                    },
                    mode => pages
                        .terms
                        .digests(mem, mode, h.digest_range, h.salt, threads),
                };
                report.hash_ms = t.elapsed().as_secs_f64() * 1e3;
                rx.reply_to(
                    &msg,
                    Tag::Digests as u16,
                    &proto::to_json(&Digests {
                        digests,
                        hash_ms: report.hash_ms,
                    }),
                )?;
                // Every batch is applied and acknowledged (the source's barrier before
                // Switchover): the decode threads are let go while the source compares the
                // digests, rather than after its Commit, in the downtime.
                appliers.stop();
                State::AwaitCommit { vm }
            }
            (State::AwaitCommit { vm }, Tag::Commit) => {
                let arrived = Instant::now();
                rx.ack(&msg)?;
                // The decode threads, stopped at Switchover, hold no VM reference.
                let counts = appliers
                    .counts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let vm = Arc::try_unwrap(vm).map_err(|_| ProtoError::Unexpected {
                    tag,
                    state: "while page batches are still being applied",
                })?;
                *report = DestReport {
                    hash_ms: report.hash_ms,
                    prealloc_ms: report.prealloc_ms,
                    ..counts
                };
                report.cpu_s = (cpu::process_time() - cpu0).as_secs_f64();
                // The vCPUs run only once the reply is out: running, busy vCPUs would compete
                // with the reply for the cores, in the downtime (a scheduler tick, 4 ms, on a
                // 2-core host). If the reply cannot be written, the VM never runs here and the
                // source rolls back.
                rx.reply_to(
                    &msg,
                    Tag::Resumed as u16,
                    &proto::to_json(&DestFigures {
                        cpu_s: report.cpu_s,
                        pages_written: report.pages_written,
                        stale_records: report.stale_records,
                        resume_ms: arrived.elapsed().as_secs_f64() * 1e3,
                    }),
                )?;
                vm.resume()?;
                return Ok(vm);
            }
            (s, tag) => {
                return Err(ProtoError::Unexpected {
                    tag,
                    state: s.name(),
                }
                .into())
            }
        };
    }
}

/// Validates a whole batch, then writes the records whose epoch is not older than what the
/// page already holds (DESIGN §4.1). Returns (records written, records dropped as stale).
fn apply_batch(
    dec: &mut BatchDecoder,
    vm: &Vm,
    pages: &PageVersions,
    msg: &Incoming,
) -> Result<(u64, u64), ReceiveError> {
    let mem = vm.memory();
    let (mut written, mut stale) = (0, 0);
    dec.decode(
        &msg.payload,
        |gpa| mem.contains(gpa, PAGE_SIZE as u64),
        |gpa, epoch, page| {
            if pages.apply(mem, gpa, epoch, page)? {
                written += 1;
            } else {
                stale += 1;
            }
            Ok::<(), MemoryError>(())
        },
    )
    .map_err(|source| ReceiveError::Batch {
        seq: msg.seq,
        source,
    })?;
    Ok((written, stale))
}
