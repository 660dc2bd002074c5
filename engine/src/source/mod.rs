//! The source side of a migration: the executor that carries out the coordinator's
//! decisions on a running VM.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Setup: Describe, Ready, bandwidth probe, bound
//!     Setup --> Live: VM keeps running
//!     Live --> Live: Send cycle / Harvest (coordinator decides)
//!     Live --> StopAndCopy: Switchover decision, VM paused
//!     StopAndCopy --> Switchover: last pages acknowledged (barrier)
//!     Switchover --> Done: digests equal, Commit, Resumed
//!     Live --> RolledBack: any error
//!     StopAndCopy --> RolledBack: any error, VM resumed
//!     Switchover --> RolledBack: mismatch or error, VM resumed
//! ```
//! The coordinator only decides (on this module's thread): it picks pages from the
//! never-sent and dirty groups and dispatches them as work items; range workers
//! (`workers`) re-arm, read, encode and hand batches to the transport, which pipelines them
//! over its lanes with a window of unacknowledged batches. The final pass after the pause is
//! spread over every worker and lane the same way.

mod pace;
mod tune;
mod workers;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::SessionSender;

use crate::bitmap::Bitmap;
use crate::coordinator::FORECAST_EVERY;
use crate::coordinator::{self, Controls, Decision, Forecast, Policy, PolicyConfig, PolicyKind};
use crate::coordinator::{cores_share, Packed, WriteClock, WriteModel};
use crate::coordinator::{PageState, Progress, StopBatches, SweepOrder, TouchedGrowth};
use crate::cpu;
use crate::digest::{self, LiveTerms, VerifyMode};
use crate::dirty::{DirtyError, DirtyTracker};
use crate::encode::{BatchEncoder, Codec, EncodeError, EncoderConfig};
use crate::memory::{GuestMemory, MemoryError, PAGE_SHIFT, PAGE_SIZE};
use crate::proto::DestFigures;
use crate::proto::{self, Describe, Digests, SwitchoverHeader, Tag};
use crate::report::{CodecTrial, Hindsight, Report, Sample, SwitchoverFigures};
use crate::report::{CpuFigures, ForecastRecord, LaneReport, Phase, ProbeFigures, ProgressEvent};
use crate::vm::{Vm, VmError};

/// Tuning of the source side; every field has a documented default.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub policy: PolicyKind,
    pub policy_cfg: PolicyConfig,
    /// Digest comparison at switchover (default: full).
    pub verify: VerifyMode,
    /// Bytes per digest range (default 64 MiB).
    pub digest_range: u64,
    /// Threads hashing at switchover (default: available cores).
    pub digest_threads: usize,
    pub encoder: EncoderConfig,
    /// How to compress: measured choice (default), or a codec forced.
    pub compress: CompressMode,
    /// Range workers (default: one per available core).
    pub workers: usize,
    /// Where workers run and which node's queue each range goes to (default: none: one
    /// queue, unpinned workers).
    pub placement: Option<Placement>,
    /// Cap on the aggregate wire rate in bytes/s (default: none).
    pub max_bandwidth: Option<f64>,
    /// Longest the bandwidth probe runs before the migration (default 300 ms).
    pub probe_time: Duration,
    /// How long to wait for each reply of the destination (default 60 s).
    pub reply_timeout: Duration,
    /// Deliberate faults, for tests of the destination's checks and of rollback.
    pub fault: Option<Fault>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::Membound,
            policy_cfg: PolicyConfig::default(),
            verify: VerifyMode::Full,
            digest_range: 64 << 20,
            digest_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            encoder: EncoderConfig::default(),
            compress: CompressMode::Auto,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            placement: None,
            max_bandwidth: None,
            probe_time: Duration::from_millis(300),
            reply_timeout: Duration::from_secs(60),
            fault: None,
        }
    }
}

/// The placement plan as the executor uses it: worker `i` is pinned to `worker_cpus[i]` and
/// serves queue `worker_queues[i]` first (one queue per NUMA node); pages of each range
/// `(gpa, len, queue)` are queued on that range's queue.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub worker_cpus: Vec<usize>,
    pub worker_queues: Vec<usize>,
    /// Sorted by gpa, disjoint.
    pub ranges: Vec<(u64, u64, usize)>,
}

impl Placement {
    /// From the planner's plan: each range goes to the queue of the node of the worker the
    /// plan gave it to.
    pub fn from_plan(plan: &crate::topo::Plan) -> Self {
        let mut nodes: Vec<_> = plan.workers.iter().map(|w| w.node).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let queue = |n| nodes.iter().position(|&x| x == n).unwrap_or(0);
        let mut ranges: Vec<(u64, u64, usize)> = plan
            .workers
            .iter()
            .flat_map(|w| {
                w.ranges
                    .iter()
                    .map(move |&(gpa, len)| (gpa, len, queue(w.node)))
            })
            .collect();
        ranges.sort_unstable();
        Self {
            worker_cpus: plan.workers.iter().map(|w| w.cpu).collect(),
            worker_queues: plan.workers.iter().map(|w| queue(w.node)).collect(),
            ranges,
        }
    }

    /// The queue of page `p`'s range (0 if no range holds it).
    fn queue_of(&self, p: u64) -> usize {
        let gpa = p << PAGE_SHIFT;
        let i = self.ranges.partition_point(|r| r.0 <= gpa);
        match i.checked_sub(1).map(|i| self.ranges[i]) {
            Some((start, len, q)) if gpa < start + len => q,
            _ => 0,
        }
    }
}

/// Compression choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressMode {
    /// Measure before starting: the codec (zstd, LZ4 or none) that moves the most pages per
    /// second through the workers' cores and the lanes; then keep measuring while the VM
    /// runs (see `tune`).
    #[default]
    Auto,
    /// This codec, whatever the probe says.
    Fixed(Codec),
}

impl std::str::FromStr for CompressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" | "zstd" => Ok(Self::Fixed(Codec::Zstd)),
            "lz4" => Ok(Self::Fixed(Codec::Lz4)),
            "off" | "raw" => Ok(Self::Fixed(Codec::Raw)),
            _ => Err(format!("{s:?}: expected auto, zstd (on), lz4 or off")),
        }
    }
}

/// Faults a test can inject into an otherwise correct migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// After the first batch, send a page whose address lies outside guest memory.
    GpaOutsideMemory,
    /// After the first batch, send a batch cut short.
    TruncatedBatch,
    /// Corrupt one page's content in the stop-and-copy, so digests differ.
    CorruptPage,
    /// Lose the first non-zero page a worker reads: re-armed, never sent, as a page lost
    /// between the dirty log and the destination would be.
    DropPage,
}

/// Why a migration failed. In every case the source VM is running again when this returns.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("transport failed")]
    Transport(#[from] ferry_transport::Error),
    #[error("the destination failed: {0}")]
    Destination(String),
    #[error("protocol error")]
    Proto(#[from] proto::ProtoError),
    #[error("dirty tracking failed")]
    Dirty(#[from] DirtyError),
    #[error("reading guest memory failed")]
    Memory(#[from] MemoryError),
    #[error("VM operation failed")]
    Vm(#[from] VmError),
    #[error("encoding a page")]
    Encode(#[from] EncodeError),
    #[error("range workers failed: {0}")]
    Workers(String),
    #[error("starting the worker threads")]
    Spawn(#[source] std::io::Error),
    #[error("the policy aborted the migration: {0}")]
    Policy(String),
    #[error("guest memory differs at switchover in {ranges} of {total} digest ranges (first at gpa {first_gpa:#x})")]
    Mismatch {
        ranges: usize,
        total: usize,
        first_gpa: u64,
    },
}

/// Resumes the source VM when dropped while armed: every error after the pause rolls back.
struct PauseGuard<'a> {
    vm: &'a Vm,
    armed: bool,
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Resuming only flips a flag the vCPU threads wait on; it cannot fail.
            let _ = self.vm.resume();
        }
    }
}

/// How much measurement an expected rate is worth when a meter starts again
/// ([`Meter::restart`]).
const RATE_PRIOR: Duration = Duration::from_millis(250);

/// Recent-throughput meter over a sliding window.
struct Meter {
    /// `(when, total)`: totals as counted, or less than 0 for an expected rate's past.
    samples: std::collections::VecDeque<(Instant, f64)>,
    window: Duration,
}

impl Meter {
    fn new() -> Self {
        Self {
            samples: Default::default(),
            window: Duration::from_secs(1),
        }
    }
    fn add(&mut self, now: Instant, total: u64) {
        self.samples.push_back((now, total as f64));
        while self.samples.len() > 2 && now.duration_since(self.samples[0].0) > self.window {
            self.samples.pop_front();
        }
    }
    /// Starts again from `total` at `now`, as if the rate had been `rate` for `prior` before:
    /// an expectation that the samples to come outweigh as they span more than `prior`.
    fn restart(&mut self, now: Instant, total: u64, rate: f64, prior: Duration) {
        self.samples.clear();
        if let Some(then) = now.checked_sub(prior) {
            self.samples
                .push_back((then, total as f64 - rate * prior.as_secs_f64()));
        }
        self.samples.push_back((now, total as f64));
    }

    fn rate(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) / b.0.duration_since(a.0).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// Times the probe encodes its sample pages with each codec (see [`Migration::probe`]).
const CODEC_PROBE_ROUNDS: usize = 2;

/// What the probe before the migration measured.
#[derive(Clone, Copy, Debug, Default)]
struct Probe {
    /// Wire bytes/s the lanes carried.
    lane_rate: f64,
    /// Per codec (in [`Codec::ALL`]'s order): wire bytes per page and seconds per page of
    /// each worker, all of them encoding at once.
    codecs: [CodecSample; 3],
    /// Cores the workers encode on: one each, at most every core there is.
    encode_cores: f64,
    /// Cores there are.
    cores: f64,
    /// The choice made, and the wire rate and bytes per page it implies.
    codec: Codec,
    rate: f64,
    bpp: f64,
    /// With the vCPUs stopped, or throttled to [`PAUSED_CODEC_AT`]: the codec, and the pages
    /// per second the workers and lanes move with it.
    paused_codec: Codec,
    paused_pages: f64,
    /// Seconds one core takes to hash a page (xxh3), for the switchover's digest comparison.
    secs_hash: f64,
    /// A message's round trip over the lanes, acknowledgement included.
    round_trip: Duration,
    /// How long the vCPUs stood still while the round trips were timed.
    pause: Duration,
    /// How fast the vCPUs run against the write probe once the workers send at `rate`: the
    /// share of their CPU time they kept while every worker encoded (the codec probe), for
    /// the share of the time the workers will be busy (set with `probe_guest_cpu`).
    busy_guest_speed: f64,
}

/// Every page the dirty log has shown written since the write probe began, and how fast that
/// set grows: the ceiling on the write model ([`WriteModel::touched`]). The log is read at each
/// forecast and each harvest; a page written and then sent between two reads is missed until
/// the guest writes it again.
struct TouchedLog {
    pages: Bitmap,
    growth: TouchedGrowth,
    /// In what order a sample of the pages was first seen written, and where the guest stands.
    clock: WriteClock,
    origin: Instant,
}

impl TouchedLog {
    /// The guest's `span` pages, for `vcpus` vCPUs (each may sweep its own share).
    fn new(span: u64, vcpus: usize) -> Self {
        Self {
            pages: Bitmap::new(span),
            growth: TouchedGrowth::default(),
            clock: WriteClock::with_shares(span, vcpus),
            origin: Instant::now(),
        }
    }

    fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.origin).as_secs_f64()
    }

    /// The guest's speed changes at `at`: the sweep's speed is measured anew from there.
    fn speed_changes(&mut self, at: Instant) {
        self.clock.speed_changes(self.secs(at));
    }

    /// Adds the pages a read of the log showed at `at`.
    fn add(&mut self, at: Instant, read: &Bitmap) {
        self.pages.or_words(0, read.words());
        let secs = self.secs(at);
        self.growth.mark(secs, self.pages.count() as f64);
        self.clock.read(secs, |p| read.get(p));
    }
}

/// The guest's writes over `window`: the dirty log is cleared for all of memory (nothing has
/// been sent yet, so nothing is lost), then harvested at a third, two thirds and the end of the
/// window; the pages written by each mark fit the forecasts' [`WriteModel`], and are the first
/// of the `touched` ones.
fn measure_writes(
    tracker: &dyn DirtyTracker,
    mem: &GuestMemory,
    window: Duration,
    touched: &mut TouchedLog,
) -> Result<WriteModel, DirtyError> {
    // Cleared a slice at a time: a list of every page of a large guest would be large too.
    const SLICE: u64 = 1 << 16;
    let mut pages = Vec::new();
    for r in mem.regions() {
        let end = r.first_page() + r.pages();
        for first in (r.first_page()..end).step_by(SLICE as usize) {
            pages.clear();
            pages.extend(first..(first + SLICE).min(end));
            tracker.clear(&pages)?;
        }
    }
    let memory: u64 = mem.regions().iter().map(|r| r.pages()).sum();
    let mut seen = Bitmap::new(mem.page_span());
    let start = Instant::now();
    touched.add(start, &seen);
    let mut u = [0.0; 3];
    for (k, u) in u.iter_mut().enumerate() {
        let mark = start + window * (k as u32 + 1) / 3;
        std::thread::sleep(mark.saturating_duration_since(Instant::now()));
        seen.clear_all();
        tracker.harvest(&mut seen)?;
        touched.add(Instant::now(), &seen);
        *u = seen.count() as f64;
    }
    log::debug!("write probe: distinct pages by each mark {u:?}");
    Ok(WriteModel::fit(
        window.as_secs_f64() / 3.0,
        u,
        memory as f64,
    ))
}

/// Empty messages the probe sends one after another to time a round trip.
const ROUND_TRIPS: u32 = 3;

/// Pages the probe hashes to time the switchover's digests (32 MiB).
const HASH_PROBE_PAGES: u64 = 8192;

/// What encoding a sample of pages with one codec cost: wire bytes per page, and seconds per
/// page of each worker, all of them encoding at once next to the running vCPUs, in time
/// (`secs`: its CPU time over the share of a core the probe's threads got) and in the
/// worker's own CPU time (`cpu_secs`: what a page takes a worker that has a core to itself,
/// as with the vCPUs paused). Both are timed past each thread's first [`PROBE_WARM_PAGES`].
#[derive(Clone, Copy, Debug, Default)]
struct CodecSample {
    bpp: f64,
    secs: f64,
    cpu_secs: f64,
}

/// Pages each probe thread encodes before it times the rest. A thread just started waits
/// behind the running ones before it first runs (the scheduler places it a slice behind
/// them), a few milliseconds next to busy vCPUs: timed from its start, zstd's 512-page share
/// read 35–45 µs a page per worker on the testbed, where the workers then encoded it at
/// 28 µs or less (the link's 72k pages a second) in the migration.
const PROBE_WARM_PAGES: u64 = 64;

/// What one probe thread's share of a sample cost: pages read and their wire bytes; and,
/// past its first [`PROBE_WARM_PAGES`], how many pages, in what time and CPU time.
#[derive(Clone, Copy, Default)]
struct Encoded {
    pages: u64,
    bytes: u64,
    timed: u64,
    secs: Duration,
    cpu: Duration,
}

/// Encodes the pages `first`, `first + step`, … of `mem` as the workers would (see
/// [`Encoded`]).
fn encode_sample(
    mem: &GuestMemory,
    cfg: EncoderConfig,
    first: u64,
    step: u64,
) -> Result<Encoded, EncodeError> {
    let mut enc = BatchEncoder::new(cfg);
    let mut page = [0u8; PAGE_SIZE];
    let mut out = Encoded::default();
    let mut start = (Instant::now(), cpu::thread_time());
    for p in (first..mem.page_span()).step_by(step as usize) {
        if out.pages == PROBE_WARM_PAGES {
            start = (Instant::now(), cpu::thread_time());
        }
        if mem.read(p << PAGE_SHIFT, &mut page).is_ok() {
            enc.push(p << PAGE_SHIFT, 0, &page)?;
            out.pages += 1;
            if enc.is_full() {
                out.bytes += enc.finish().0.len() as u64;
            }
        }
    }
    out.bytes += enc.finish().0.len() as u64;
    out.timed = out.pages.saturating_sub(PROBE_WARM_PAGES);
    if out.timed == 0 {
        out.timed = out.pages;
    }
    out.secs = start.0.elapsed();
    out.cpu = cpu::thread_time().saturating_sub(start.1);
    Ok(out)
}

/// Each codec's sample from its timings (the codec's index in [`Codec::ALL`], and what it
/// cost): its lowest CPU time a page, and that over the share of a core the probe's threads
/// got in all the timings together.
fn codec_samples(timings: &[(usize, Encoded)]) -> [CodecSample; 3] {
    let mut cpu_secs = [f64::MAX; 3];
    let mut bpp = [0.0; 3];
    let (mut wall, mut cpu) = (Duration::ZERO, Duration::ZERO);
    for (i, e) in timings {
        wall += e.secs;
        cpu += e.cpu;
        cpu_secs[*i] = cpu_secs[*i].min(e.cpu.as_secs_f64() / e.timed.max(1) as f64);
        bpp[*i] = (e.bytes as f64 / e.pages.max(1) as f64).max(16.0);
    }
    let share = (cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)).clamp(0.01, 1.0);
    std::array::from_fn(|i| CodecSample {
        bpp: bpp[i],
        secs: cpu_secs[i] / share,
        cpu_secs: cpu_secs[i],
    })
}

impl CodecSample {
    /// The sample of `codec` among samples in [`Codec::ALL`]'s order.
    fn of(samples: &[CodecSample; 3], codec: Codec) -> CodecSample {
        let i = Codec::ALL.iter().position(|&c| c == codec).unwrap_or(0);
        samples[i]
    }

    /// Pages per second `workers` move with this codec over lanes carrying `lane_rate` wire
    /// bytes per second: the lower of what they encode and what the lanes carry. Next to
    /// running vCPUs a worker takes the time it took in the sample; with the vCPUs `paused`
    /// (or mostly throttled) each has its core and takes its CPU time.
    fn pages(&self, workers: f64, lane_rate: f64, paused: bool) -> f64 {
        let secs = if paused { self.cpu_secs } else { self.secs };
        (workers / secs.max(1e-9)).min(lane_rate / self.bpp)
    }
}

/// The codec whose sample (in [`Codec::ALL`]'s order) moves the most pages per second by
/// `pages`; on a tie the first, the better ratio.
fn fastest(samples: &[CodecSample; 3], pages: impl Fn(&CodecSample) -> f64) -> Codec {
    Codec::ALL
        .into_iter()
        .zip(samples)
        .fold((Codec::ALL[0], 0.0), |best, (c, s)| {
            let p = pages(s);
            if p > best.1 {
                (c, p)
            } else {
                best
            }
        })
        .0
}

/// The throttle from which the vCPUs leave the workers the cores, as when paused: the codec
/// is then the probe's best for paused vCPUs ([`Migration::settle_codec`]).
const PAUSED_CODEC_AT: f64 = 0.9;

/// Progress marks at which the report keeps the policy's forecast.
const FORECAST_MARKS: [f64; 4] = [0.0, 0.10, 0.25, 0.50];

/// The least live time after a progress mark its hindsight's rates are measured over.
const HINDSIGHT_MIN: Duration = Duration::from_millis(100);

/// A progress mark's forecast as it was made, for its hindsight ([`Migration::hindsight`]).
struct Mark {
    /// Its index in the report's forecasts.
    record: usize,
    policy: Box<dyn Policy>,
    progress: Progress,
    counts: Counts,
    guest_speed: f64,
    /// Wire bytes the lanes held then.
    unacked: u64,
}

/// Running totals the rates after a progress mark are measured from.
#[derive(Clone, Copy)]
struct Counts {
    at: Instant,
    /// CPU time the vCPU threads took, and the time they were let run (throttle aside).
    vcpu_ns: f64,
    unthrottled_ns: f64,
    /// Wire bytes delivered and handed to the lanes, and pages encoded.
    delivered: f64,
    wire: f64,
    encoded: f64,
}

/// How often the forecast's range is worked out afresh ([`coordinator::forecast_range`]): two
/// forecasts more, 1–2 ms each for the multiplexing policies on a sweep followed page by page
/// (`benches/benches/forecast.rs`), on the thread that decides the sends. With every forecast
/// (each 100 ms), timebound's `dirty-all` row took 3.4 and 3.3 s against 2.8 and 2.5 s without
/// (same hour); every second, 2.8–3.5 s against 2.7–3.6 s over 4 runs an arm. In between, the
/// range keeps its width against the forecast; at a progress mark it is worked out afresh.
const RANGE_EVERY: Duration = Duration::from_secs(1);

/// One migration of a running VM to the destination behind `tx`: the coordinator's state.
struct Migration<'a, 'd, 's> {
    vm: &'a Vm,
    tx: &'a SessionSender,
    cfg: &'a SourceConfig,
    shared: &'s workers::Shared<'a>,
    dispatch: &'d workers::Dispatch<'a, 's>,
    n_workers: usize,
    t0: Instant,
    epoch: u32,
    never_sent: Bitmap,
    sent: Bitmap,
    /// The dirty group: cold pages, and hot ones (written again within an epoch of being
    /// resent, or never sent and held back: see `defer_written`), which a policy may defer.
    dirty: Bitmap,
    hot: Bitmap,
    /// Pages resent since the last harvest.
    resent: Bitmap,
    scratch: Bitmap,
    cursor_never: u64,
    cursor_dirty: u64,
    cursor_hot: u64,
    pending: Vec<u64>,
    pages_sent: u64,
    /// Never-sent pages moved to the hot group because the log showed them written.
    deferred: u64,
    dirtied_last_epoch: u64,
    /// What the next harvest will add to the dirty groups, as the last read of the log showed.
    unharvested: u64,
    last_harvest: Instant,
    meter: Meter,
    /// Wire bytes and pages the workers finished, over the same window: what a page costs on
    /// the wire now.
    encoded: (Meter, Meter),
    /// vCPU CPU time (ns) over the recent window, and its rate during the probe (ns/s): how
    /// fast the guest runs now against when its writes were measured.
    guest_cpu: Meter,
    /// CPU time of the whole source process (ns), for the debug log: what the vCPUs leave to
    /// the workers and the rest.
    process_cpu: Meter,
    probe_guest_cpu: f64,
    /// Wall time the vCPUs were given (ns: time × (1 − throttle)), summed up to
    /// `unthrottled_at`, and over the same window as `guest_cpu`: what the guest could run
    /// over that window, a throttle changed within it included.
    unthrottled_ns: u64,
    unthrottled_at: Instant,
    unthrottled: Meter,
    /// The guest's speed measured on the cores it had before their last change, until
    /// `guest_cpu` measures it on the new ones; `None` before any change.
    unmeasured_speed: Option<f64>,
    /// When the forecast's range was last worked out, and its ends against the time left.
    range: Option<(Instant, [f64; 2])>,
    probe: Probe,
    /// The guest's writes, as the probe measured them, and what the dirty log showed since.
    writes: Option<WriteModel>,
    touched: TouchedLog,
    /// What the clock in `touched` showed at the last read between harvests.
    sweep_order: Option<Arc<SweepOrder>>,
    bound: Option<Duration>,
    /// The controls in force (as last applied to the VM).
    controls: Controls,
    max_throttle: f64,
    min_cores: Option<usize>,
    /// How long one side takes to hash memory at switchover (see `with_switchover`).
    hash_time: Duration,
    /// Pages hashed for the digests while the VM ran (`--verify full`).
    live_hash_pages: u64,
    forecasts: Vec<ForecastRecord>,
    /// Where each of `forecasts` was made from, for its hindsight at the end of the live phase.
    marks: Vec<Mark>,
    /// The counts when the policy first throttled or over-committed the vCPUs, if it did: the
    /// policies price those controls' effects themselves (the guest slowed, the workers given
    /// the cores, a paused codec from [`PAUSED_CODEC_AT`]; an over-commit due foreseen), so a
    /// mark's hindsight takes the rates up to then.
    controlled: Option<Counts>,
    timeline: Vec<Sample>,
    /// With `--compress auto`, what keeps the codec the fastest one while the VM runs; once
    /// it has ended, the codec it settled on and the trials it made.
    tuner: Option<tune::Tuner>,
    live_codec: Option<Codec>,
    codec_trials: Vec<CodecTrial>,
    /// How the pages' bytes per page compared with the probe's sample at the codec's switch.
    bpp_scale: f64,
}

/// Migrates `vm` (running, with `tracker` watching its memory) over `tx`. On success the
/// VM is left paused (it now runs on the destination); on failure it is running again.
pub fn migrate(
    vm: &Vm,
    tracker: &dyn DirtyTracker,
    tx: &SessionSender,
    cfg: &SourceConfig,
    progress: &mut dyn FnMut(&ProgressEvent),
) -> Result<Report, MigrateError> {
    let span = vm.memory().page_span();
    let mut never_sent = Bitmap::new(span);
    for r in vm.memory().regions() {
        for p in r.first_page()..r.first_page() + r.pages() {
            never_sent.set(p);
        }
    }
    let live_terms = (cfg.verify == VerifyMode::Full).then(|| LiveTerms::new(&never_sent));
    let shared = workers::Shared::new(
        vm,
        tracker,
        tx,
        cfg.encoder.clone(),
        cfg.fault,
        cfg.max_bandwidth,
        live_terms.as_ref(),
    );
    let cpu0 = (cpu::process_time(), vm.vcpu_cpu_time());
    let (cpus, queues): (Vec<Option<usize>>, Vec<usize>) = match &cfg.placement {
        Some(p) if !p.worker_cpus.is_empty() => (
            p.worker_cpus.iter().map(|&c| Some(c)).collect(),
            p.worker_queues.clone(),
        ),
        _ => (vec![None; cfg.workers.max(1)], vec![0; cfg.workers.max(1)]),
    };
    let n_workers = cpus.len();
    let mut result = std::thread::scope(|scope| {
        let dispatch =
            workers::start(scope, &shared, &cpus, &queues).map_err(MigrateError::Spawn)?;
        let mut m = Migration {
            vm,
            tx,
            cfg,
            shared: &shared,
            dispatch: &dispatch,
            n_workers,
            t0: Instant::now(),
            epoch: 0,
            never_sent,
            sent: Bitmap::new(span),
            dirty: Bitmap::new(span),
            hot: Bitmap::new(span),
            resent: Bitmap::new(span),
            scratch: Bitmap::new(span),
            cursor_never: 0,
            cursor_dirty: 0,
            cursor_hot: 0,
            deferred: 0,
            pending: Vec::new(),
            pages_sent: 0,
            dirtied_last_epoch: 0,
            unharvested: 0,
            last_harvest: Instant::now(),
            meter: Meter::new(),
            encoded: (Meter::new(), Meter::new()),
            guest_cpu: Meter::new(),
            process_cpu: Meter::new(),
            probe_guest_cpu: 0.0,
            unthrottled_ns: 0,
            unthrottled_at: Instant::now(),
            unthrottled: Meter::new(),
            unmeasured_speed: None,
            range: None,
            probe: Probe::default(),
            writes: None,
            sweep_order: None,
            touched: TouchedLog::new(span, vm.vcpu_count()),
            bound: None,
            controls: Controls::default(),
            max_throttle: 0.0,
            min_cores: None,
            hash_time: Duration::ZERO,
            live_hash_pages: 0,
            forecasts: Vec::new(),
            marks: Vec::new(),
            controlled: None,
            timeline: Vec::new(),
            tuner: None,
            live_codec: None,
            codec_trials: Vec::new(),
            bpp_scale: 1.0,
        };
        let r = m.run(progress);
        // Let the workers finish what they hold before the scope joins them.
        let _ = dispatch.drain();
        r
    });
    // Whatever happened, the vCPUs get their time and cores back (on success they are paused
    // for good; on failure the VM goes on running here).
    vm.set_throttle(0.0);
    if let Err(e) = vm.overcommit(None) {
        log::warn!("could not give the vCPU threads their own affinity back: {e}");
    }
    if let Ok(report) = &mut result {
        // Everything this process spent apart from running the guest.
        let spent = (cpu::process_time() - cpu0.0).saturating_sub(vm.vcpu_cpu_time() - cpu0.1);
        report.cpu.source_s = spent.as_secs_f64();
        report.cpu.workers_s = shared.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let gib = (report.pages_sent * PAGE_SIZE as u64) as f64 / (1u64 << 30) as f64;
        if gib > 0.0 {
            report.cpu.source_s_per_gib = report.cpu.source_s / gib;
            report.cpu.destination_s_per_gib = report.cpu.destination_s / gib;
        }
    }
    if let Err(MigrateError::Transport(_)) = &result {
        // A destination that rejects something replies `Failed` and then closes the
        // connection; report its reason rather than the closed connection.
        while let Ok((tag, payload)) = tx.recv_reply(Duration::ZERO) {
            if tag == Tag::Failed as u16 {
                result = Err(unexpected_reply(tag, &payload));
                break;
            }
        }
    }
    if result.is_err() {
        // Best effort: tell the destination to discard what it has; it may already be gone.
        // A session Abort frame, written before this returns: a queued message would be
        // dropped unwritten when the caller drops the session.
        tx.abort("source rolled back");
    }
    result
}

impl Migration<'_, '_, '_> {
    fn run(&mut self, progress: &mut dyn FnMut(&ProgressEvent)) -> Result<Report, MigrateError> {
        let mem = self.vm.memory();
        self.tx.send(
            Tag::Describe as u16,
            proto::to_json(&Describe {
                layout: mem.layout(),
                vcpus: self.vm.vcpu_count() as u32,
                policy: self.cfg.policy.to_string(),
            }),
        )?;
        // A first event, without a bound or an ETA yet: the destination may take seconds to
        // allocate a large guest's memory before it is ready.
        progress(&self.event(Phase::Setup));
        let ready = self.recv_reply(
            Tag::Ready,
            ready_timeout(self.cfg.reply_timeout, mem.size()),
        )?;
        let ready = proto::Ready::decode(&ready)?;
        self.probe = self.probe()?;
        self.hash_time = self.hash_time();
        self.shared
            .codec
            .store(self.probe.codec.to_u8(), Ordering::Relaxed);
        self.bound = coordinator::bound(
            self.cfg.policy,
            mem.size(),
            self.probe.rate,
            self.probe.bpp,
            &self.cfg.policy_cfg,
        );

        // Live phase. The setup's last event has the bound and the policy's forecast from the
        // first page on: a scheduler's hook knows when the node will be empty before a page
        // is sent.
        let mut policy = coordinator::make_policy(self.cfg.policy, &self.cfg.policy_cfg);
        let mut ready_event = self.event(Phase::Setup);
        let setup = self.t0.elapsed();
        self.t0 = Instant::now();
        self.last_harvest = self.t0;
        self.unthrottled_at = self.t0;
        // The policy's controls from the first page on, and the log read once before it: what
        // the guest wrote since the probe is known to the first forecast and, while hot pages
        // wait, held back from the first send.
        self.apply(policy.controls())?;
        self.peek()?;
        let p = self.progress();
        let f = policy.forecast(&p);
        let range = self.eta_range(&*policy, &p, &f);
        self.note_forecast(&*policy, &p, &f, range);
        ready_event.eta_ms = f.is_known().then(|| self.time_left(&f).as_secs_f64() * 1e3);
        ready_event.eta_range_ms = range;
        progress(&ready_event);
        if self.cfg.compress == CompressMode::Auto {
            self.tuner = Some(tune::Tuner::new(
                self.probe.codec,
                self.probe.lane_rate,
                self.probe.codecs.map(|s| s.bpp),
                self.probe.codecs.map(|s| self.probe.encode_cores / s.secs),
                self.t0,
            ));
        }
        let mut last_event = self.t0;
        let mut pick = Vec::new();
        // Whether the lanes have delivered everything queued and the log was harvested
        // after, and how long the VM ran while they delivered it.
        let mut settled = false;
        let mut drain = Duration::ZERO;
        let downtime_forecast = loop {
            let now = Instant::now();
            if now.duration_since(last_event) >= FORECAST_EVERY {
                last_event = now;
                self.meter.add(now, self.delivered_bytes());
                // Read together: the workers add both when a batch is finished.
                let wire = self.wire_bytes();
                let pages = self.shared.encoded_pages.load(Ordering::Relaxed);
                self.encoded.0.add(now, wire);
                self.encoded.1.add(now, pages);
                self.tune(now);
                let guest_ns = self.vm.vcpu_cpu_time().as_nanos() as u64;
                self.guest_cpu.add(now, guest_ns);
                self.process_cpu
                    .add(now, cpu::process_time().as_nanos() as u64);
                self.count_unthrottled(now);
                self.unthrottled.add(now, self.unthrottled_ns);
                self.check_destination()?;
                self.hash_live()?;
                self.peek()?;
                let p = self.progress();
                let f = policy.forecast(&p);
                log::debug!(
                    "forecast t={:.0}ms never_sent={} dirty={} hot={} unharvested={} B/s={:.0} \
                     B/page={:.0} guest_speed={:.2} cores: vcpus={:.2} others={:.2} \
                     touched={:?} drift={:.0} sweep={:.0} scattered={} left={:?} downtime={:?} \
                     order={:?}",
                    p.elapsed.as_secs_f64() * 1e3,
                    p.never_sent,
                    p.dirty,
                    p.hot,
                    self.unharvested,
                    p.bandwidth,
                    p.bytes_per_page,
                    self.guest_speed(),
                    self.guest_cpu.rate() / 1e9,
                    (self.process_cpu.rate() - self.guest_cpu.rate()) / 1e9,
                    p.writes
                        .and_then(|m| m.touched)
                        .map(|t| (t.pages, t.rate as u64)),
                    p.writes.map_or(0.0, |m| m.drift),
                    p.sweep_order
                        .as_ref()
                        .map_or(0.0, |o| o.whole.speed * o.stride),
                    p.sweep_order.as_ref().is_some_and(|o| o.scattered),
                    f.remaining,
                    f.downtime,
                    p.sweep_order
                );
                let range = self.eta_range(&*policy, &p, &f);
                self.note_forecast(&*policy, &p, &f, range);
                let mut ev = self.event(Phase::Live);
                ev.fraction = f.fraction_done;
                let eta_ms = self.time_left(&f).as_secs_f64() * 1e3;
                ev.eta_ms = f.is_known().then_some(eta_ms);
                ev.eta_range_ms = range;
                self.sample(Phase::Live, eta_ms);
                progress(&ev);
            }
            let decision = policy.decide(&self.progress());
            let before = self.controls;
            self.apply(policy.controls())?;
            if (self.controls.throttle, self.controls.cores) != (before.throttle, before.cores) {
                // The timeline shows each change to the vCPUs when it happens, not at the next
                // forecast: a short over-commit or tail pass could fall between two.
                let eta_ms = self.timeline.last().map_or(0.0, |s| s.eta_ms);
                self.sample(Phase::Live, eta_ms);
            }
            match decision {
                Decision::Send { never_sent, dirty } => {
                    pick.clear();
                    self.never_sent
                        .take(&mut self.cursor_never, never_sent as usize, &mut pick);
                    let first_dirty = pick.len();
                    let cold = self
                        .dirty
                        .take(&mut self.cursor_dirty, dirty as usize, &mut pick);
                    if cold < dirty as usize && !self.controls.defer_hot {
                        self.hot
                            .take(&mut self.cursor_hot, dirty as usize - cold, &mut pick);
                    }
                    for &p in &pick[first_dirty..] {
                        self.resent.set(p);
                    }
                    self.queue(&pick)?;
                    settled &= pick.is_empty();
                }
                Decision::Harvest => {
                    self.flush()?;
                    // Every picked page is re-armed before the harvest reads the log, so a
                    // page in flight is not counted dirty again.
                    self.dispatch.drain()?;
                    self.harvest()?;
                }
                Decision::Switchover if !settled => {
                    // The policy decided on a harvest taken while the lanes still carried
                    // its last pages. Deliver them first (the VM running, under the
                    // policy's controls), then harvest and ask again: the decision and its
                    // forecast then see what the guest wrote meanwhile, which would
                    // otherwise all be in the stop-and-copy.
                    drain += self.settle()?;
                    self.harvest()?;
                    settled = true;
                }
                Decision::Switchover => {
                    let f = policy.forecast(&self.progress());
                    break f
                        .is_known()
                        .then(|| self.with_switchover(f.downtime, f.downtime));
                }
                Decision::Abort(why) => return Err(MigrateError::Policy(why)),
            }
        };
        // The loop ends only settled: nothing is queued or in flight.
        let drain_ms = drain.as_secs_f64() * 1e3;
        self.hindsight();
        self.settle_codec();

        // Stop-and-copy, spread over every worker and lane. Its event goes out before the
        // pause, and none in the downtime: each wakes the stream's reader (`ferry migrate`, a
        // scheduler hook), which on a 2-core host takes a core from the switchover.
        let mut ev = self.event(Phase::StopAndCopy);
        ev.eta_ms = downtime_forecast.map(|d| d.as_secs_f64() * 1e3);
        progress(&ev);
        let paused_at = Instant::now();
        self.vm.pause()?;
        let mut guard = PauseGuard {
            vm: self.vm,
            armed: true,
        };
        // The vCPUs get their time and cores back once stopped: unthrottled for even a
        // millisecond before the pause, a busy guest dirties hundreds of pages more.
        self.apply(Controls::default())?;
        // Each step of the downtime runs from the end of the previous one.
        let mut mark = paused_at;
        let mut lap = || {
            let now = Instant::now();
            let ms = now.duration_since(mark).as_secs_f64() * 1e3;
            mark = now;
            ms
        };
        let mut steps = SwitchoverFigures {
            drain_ms,
            pause_ms: lap(),
            ..SwitchoverFigures::default()
        };
        self.sample(Phase::StopAndCopy, 0.0);
        self.take_log()?;
        let mut rest: Vec<u64> = self.never_sent.iter_ones().collect();
        rest.extend(self.dirty.iter_ones());
        rest.extend(self.hot.iter_ones());
        rest.sort_unstable();
        self.never_sent.clear_all();
        self.dirty.clear_all();
        self.hot.clear_all();
        let final_pages = rest.len() as u64;
        if self.cfg.fault == Some(Fault::CorruptPage) {
            self.shared.corrupt_next_page();
        }
        // Memory stands still from here: hash it while the last pages travel. The destination
        // kept its digests as it wrote pages (unless told to re-read its memory).
        let salt = self.t0.elapsed().as_nanos() as u64;
        let (verify, range, threads) = (
            self.cfg.verify,
            self.cfg.digest_range,
            self.cfg.digest_threads,
        );
        steps.harvest_ms = lap();
        let (ours, hash_pages, ours_ms, state) =
            std::thread::scope(|s| -> Result<_, MigrateError> {
                let live_terms = self.shared.live_terms;
                let hasher = crate::threads::spawn(s, move || {
                    let t = Instant::now();
                    // SAFETY: the vCPUs are paused until the destination resumes or this source
                    // rolls back, and the workers only read guest memory.
                    let d = unsafe {
                        match live_terms {
                            Some(terms) => terms.finish(mem, range, threads),
                            None => digest::digests(mem, verify, range, salt, threads).map(|d| {
                                let pages = (mem.size() / PAGE_SIZE as u64) as f64 * verify.share();
                                (d, pages as u64)
                            }),
                        }
                    };
                    (d, t.elapsed().as_secs_f64() * 1e3)
                });
                let sent = (|| {
                    let batch = self.stop_batches().batch(final_pages);
                    self.queue_in(&rest, batch)?;
                    self.flush()?;
                    // The VM's state is read while the workers encode the last pages.
                    let state = self.vm.save_state()?;
                    self.dispatch.drain()?;
                    self.tx.barrier()?;
                    Ok::<_, MigrateError>(state)
                })();
                let (digests, ms) = hasher.join().expect("hashing does not panic");
                let (digests, pages) = digests?;
                Ok((digests, pages, ms, sent?))
            })?;

        (steps.final_pages_ms, steps.hash_ms) = (lap(), ours_ms);
        (steps.hash_pages, steps.live_hash_pages) = (hash_pages, self.live_hash_pages);

        // Switchover: state, digests compared, commit.
        self.sample(Phase::Switchover, 0.0);
        self.tx.send(
            Tag::Switchover as u16,
            proto::encode_switchover(
                &SwitchoverHeader {
                    final_epoch: self.epoch,
                    verify: self.cfg.verify,
                    digest_range: self.cfg.digest_range,
                    salt,
                },
                &state.to_bytes(),
            ),
        )?;
        let theirs: Digests = proto::from_json("Digests", &self.expect_reply(Tag::Digests)?)?;
        let bad = digest::mismatches(&ours, &theirs.digests);
        if !bad.is_empty() {
            return Err(MigrateError::Mismatch {
                ranges: bad.len(),
                total: ours.len(),
                first_gpa: bad[0] as u64 * self.cfg.digest_range,
            });
        }
        steps.state_ms = lap();
        // Lane figures before the commit: the destination closes its lanes once resumed.
        let lane_stats = self.tx.stats();
        let commit_at = Instant::now();
        self.tx.send(Tag::Commit as u16, Vec::new())?;
        let resumed: DestFigures = proto::from_json("Resumed", &self.expect_reply(Tag::Resumed)?)?;
        guard.armed = false;
        let done = Instant::now();
        // The downtime ends when the destination runs the vCPUs: the Commit's way there (half
        // the round trip the probe measured) and the destination's time from its arrival to
        // the resume, as it reports. The reply takes another way back, and on one host shared
        // by both sides must also wait for a core the resumed vCPUs leave free: that is
        // `ack_ms`, in the total but not in the downtime.
        let resumed_at = done.min(
            commit_at
                + self.probe.round_trip / 2
                + Duration::try_from_secs_f64(resumed.resume_ms / 1e3).unwrap_or_default(),
        );
        steps.ack_ms = done.duration_since(resumed_at).as_secs_f64() * 1e3;
        steps.commit_ms = lap() - steps.ack_ms;
        self.sample(Phase::Done, 0.0);

        let total = done.duration_since(self.t0).as_secs_f64() * 1e3;
        let wire_bytes = self.wire_bytes();
        let [zstd, lz4, raw] =
            [Codec::Zstd, Codec::Lz4, Codec::Raw].map(|c| CodecSample::of(&self.probe.codecs, c));
        let paused_codec = self.codec();
        let codec = self.live_codec.unwrap_or(paused_codec);
        let mut report = Report {
            verified: true,
            verify: self.cfg.verify,
            policy: self.cfg.policy.to_string(),
            converged: !policy.limit_reached(),
            mem_bytes: mem.size(),
            vcpus: self.vm.vcpu_count() as u32,
            workers: self.n_workers,
            compressed: codec != Codec::Raw,
            codec: codec.to_string(),
            paused_codec: Some(paused_codec.to_string()),
            codec_trials: std::mem::take(&mut self.codec_trials),
            total_ms: total,
            live_ms: paused_at.duration_since(self.t0).as_secs_f64() * 1e3,
            downtime_ms: resumed_at.duration_since(paused_at).as_secs_f64() * 1e3,
            eviction_ms: total,
            setup_ms: setup.as_secs_f64() * 1e3,
            bound_ms: self.bound.map(|b| b.as_secs_f64() * 1e3),
            within_bound: self.bound.map(|b| total <= b.as_secs_f64() * 1e3),
            wire_bytes,
            pages_sent: self.pages_sent,
            pages: *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()),
            compression_ratio: (self.pages_sent * PAGE_SIZE as u64) as f64
                / wire_bytes.max(1) as f64,
            epochs: self.epoch,
            throughput_bytes_per_s: wire_bytes as f64 / (total / 1e3).max(1e-9),
            probe: ProbeFigures {
                lane_bytes_per_s: self.probe.lane_rate,
                zstd_wire_bytes_per_page: zstd.bpp,
                zstd_us_per_page: zstd.secs * 1e6,
                lz4_wire_bytes_per_page: lz4.bpp,
                lz4_us_per_page: lz4.secs * 1e6,
                raw_wire_bytes_per_page: raw.bpp,
                raw_us_per_page: raw.secs * 1e6,
                bytes_per_s: self.probe.rate,
                paused_bytes_per_s: Some(
                    self.probe.paused_pages
                        * CodecSample::of(&self.probe.codecs, self.probe.paused_codec).bpp,
                ),
                wire_bytes_per_page: self.probe.bpp,
                write_pages_per_s: self.writes.map(|m| m.rate),
                working_set_pages: self.writes.map(|m| m.wss),
                write_drift_pages_per_s: self.writes.map(|m| m.drift),
                round_trip_ms: self.probe.round_trip.as_secs_f64() * 1e3,
                pause_ms: self.probe.pause.as_secs_f64() * 1e3,
                dest_prealloc_ms: ready.prealloc_ms,
                busy_guest_speed: Some(self.probe.busy_guest_speed),
            },
            final_pages,
            deferred_pages: self.deferred,
            digest_ranges: ours.len(),
            digest_ms: ours_ms.max(theirs.hash_ms),
            switchover: steps,
            lanes: Vec::new(),
            cpu: CpuFigures {
                destination_s: resumed.cpu_s,
                ..CpuFigures::default()
            },
            max_bandwidth_bytes_per_s: self.cfg.max_bandwidth,
            forecasts: std::mem::take(&mut self.forecasts),
            downtime_forecast_ms: downtime_forecast.map(|d| d.as_secs_f64() * 1e3),
            max_throttle: self.max_throttle,
            min_vcpu_cores: self.min_cores,
            timeline: std::mem::take(&mut self.timeline),
        };
        for (i, l) in lane_stats.iter().enumerate() {
            report.lanes.push(LaneReport {
                lane: i,
                bytes: l.bytes,
                messages: l.messages,
                throughput_bytes_per_s: l.bytes as f64 / (total / 1e3).max(1e-9),
                failed: l.failed.clone(),
            });
        }
        let mut ev = self.event(Phase::Done);
        ev.fraction = 1.0;
        ev.eta_ms = Some(0.0);
        progress(&ev);
        Ok(report)
    }

    fn wire_bytes(&self) -> u64 {
        self.shared.wire_bytes.load(Ordering::Relaxed)
    }

    /// Wire bytes the destination has acknowledged. Those the lanes were handed run ahead by
    /// what the socket buffers hold: counted, the first second's rate read 130–137 MB/s on a
    /// 125 MB/s link, and the time left came out short by as much.
    fn delivered_bytes(&self) -> u64 {
        self.wire_bytes().saturating_sub(self.tx.unacked_bytes())
    }

    /// Wire bytes per second delivered over the last second, or the probe's rate before.
    fn bandwidth(&self) -> f64 {
        match self.meter.rate() {
            r if r > 0.0 => r,
            _ => self.probe.rate,
        }
    }

    /// The codec the workers use for the pages they read from now on.
    fn set_codec(&self, c: Codec) {
        self.shared.codec.store(c.to_u8(), Ordering::Relaxed);
    }

    /// How the stop-and-copy's pages go to the workers.
    fn stop_batches(&self) -> StopBatches {
        StopBatches {
            workers: self.n_workers,
            max_pages: self.shared.encoder.max_pages,
            encode_page_time: CodecSample::of(&self.probe.codecs, self.probe.paused_codec).cpu_secs,
        }
    }

    /// The codec the workers use now.
    fn codec(&self) -> Codec {
        Codec::from_u8(self.shared.codec.load(Ordering::Relaxed))
    }

    /// Ends the tuning of the codec (`--compress auto`) when the workers get the cores: the
    /// vCPUs are stopped for the stop-and-copy, or throttled to [`PAUSED_CODEC_AT`] (no policy
    /// lowers its throttle again before the switchover). From then on the workers use the
    /// probe's best codec with the cores to themselves: on the 1 Gbit/s testbed that is zstd
    /// at the link's rate, where LZ4, the live phase's choice next to busy vCPUs, moves a
    /// fifth fewer pages.
    ///
    /// The bytes per page measured over the last second start again with the new codec: in
    /// the second after the switch they were still mostly the old codec's, and a membound
    /// tail's forecast priced its zstd pages as LZ4's, 1.2 × too long. Until they read, the
    /// probe's figure for the new codec, scaled as the pages measured so far compare with the
    /// probe's sample.
    fn settle_codec(&mut self) {
        if let Some(t) = self.tuner.take() {
            let codec;
            (codec, self.codec_trials) = t.finish();
            self.live_codec = Some(codec);
            if codec != self.probe.paused_codec {
                let (wire, encoded) = (
                    self.wire_bytes(),
                    self.shared.encoded_pages.load(Ordering::Relaxed),
                );
                let probed = CodecSample::of(&self.probe.codecs, self.codec()).bpp;
                self.bpp_scale = self.bytes_per_page(wire, encoded) / probed.max(1.0);
                self.encoded = (Meter::new(), Meter::new());
            }
            self.set_codec(self.probe.paused_codec);
        }
    }

    /// Lets the tuner see the pages and bytes sent so far, and switches the workers' codec
    /// if it says so.
    fn tune(&mut self, now: Instant) {
        let pages = self.shared.encoded_pages.load(Ordering::Relaxed);
        let wire = self.wire_bytes();
        if let Some(c) = self
            .tuner
            .as_mut()
            .and_then(|t| t.observe(now, pages, wire))
        {
            log::info!("compression: switching to {c}");
            self.set_codec(c);
        }
    }

    /// Applies what changed in the policy's controls to the VM.
    fn apply(&mut self, c: Controls) -> Result<(), MigrateError> {
        if (c.throttle, c.cores) == (self.controls.throttle, self.controls.cores) {
            self.controls = c;
            return Ok(());
        }
        let now = Instant::now();
        self.count_unthrottled(now);
        if self.controlled.is_none() {
            self.controlled = Some(self.counts(now));
        }
        if c.throttle != self.controls.throttle {
            self.vm.set_throttle(c.throttle);
            self.max_throttle = self.max_throttle.max(self.vm.throttle());
            if c.throttle >= PAUSED_CODEC_AT {
                self.settle_codec();
            }
        }
        if c.cores != self.controls.cores {
            if let Some(cpus) = self.vm.overcommit(c.cores)? {
                self.min_cores = Some(self.min_cores.map_or(cpus.len(), |m| m.min(cpus.len())));
            }
            // The guest's speed, and a sweep's, are measured afresh on its new cores, and so
            // is the lanes' rate, from what the over-commit was expected to leave them (or the
            // rate before): over a window that still held the old cores they would lag the
            // change for a second.
            let bandwidth = self.bandwidth();
            // Only packing foresees the lanes' rate (the controls still hold the old cores).
            let expected = self
                .overcommit_ahead()
                .map_or(bandwidth, |a| a.bandwidth.max(bandwidth));
            self.meter
                .restart(now, self.delivered_bytes(), expected, RATE_PRIOR);
            self.unmeasured_speed = Some(self.guest_speed());
            self.guest_cpu = Meter::new();
            self.unthrottled = Meter::new();
            self.touched.speed_changes(now);
        }
        self.controls = c;
        Ok(())
    }

    /// A forecast `d` that ends with `pages` of stop-and-copy transfer, plus the switchover's
    /// own cost: the source hashes while those pages travel (with `--verify full` only those
    /// pages; else all of memory, and the destination too after the last one with
    /// `reread`), then a few round trips (state and digests, commit).
    fn with_switchover(&self, d: Duration, pages: Duration) -> Duration {
        // The barrier after the last pages and the VM state, a round trip each; the Commit's
        // way there. Beyond those, the steps' own work, as the reports' `switchover` figures
        // show it on an idle 512 MiB guest on the testbed (medians of two runs of idle and
        // `seq` rows): pausing and the last harvest (~0.15 ms), the last batch through a
        // worker and a decode thread (~0.5 ms), restoring the state and summing the
        // destination's digests (~0.35 ms), resuming (~0.05 ms); one row in ten takes
        // 0.3 ms more or less.
        const STEPS: Duration = Duration::from_micros(900);
        let fixed = STEPS.saturating_add(self.probe.round_trip.mul_f64(2.5));
        let hash = self.hash_time;
        let theirs = match self.cfg.verify {
            VerifyMode::Reread => hash,
            _ => Duration::ZERO,
        };
        d.saturating_add(hash.saturating_sub(pages))
            .saturating_add(theirs)
            .saturating_add(fixed)
    }

    /// The time left by forecast `f`: the policy's pages, what the lanes still carry (the
    /// switchover waits for it before the pause), and the switchover.
    fn time_left(&self, f: &Forecast) -> Duration {
        self.time_left_at(f, self.tx.unacked_bytes(), self.bandwidth())
    }

    /// [`Self::time_left`] with `unacked` wire bytes in the lanes, carried at `bandwidth`.
    fn time_left_at(&self, f: &Forecast, unacked: u64, bandwidth: f64) -> Duration {
        let in_flight = Duration::from_secs_f64(unacked as f64 / bandwidth.max(1.0));
        self.with_switchover(f.remaining, f.downtime)
            .saturating_add(in_flight)
    }

    /// The time left, in ms, at the ends of the range of `policy`'s forecast `f` from `p`
    /// ([`coordinator::forecast_range`]), worked out afresh every [`RANGE_EVERY`] and at each
    /// progress mark; in between, as wide against `f` as it was then.
    fn eta_range(&mut self, policy: &dyn Policy, p: &Progress, f: &Forecast) -> Option<[f64; 2]> {
        if !f.is_known() {
            return None;
        }
        let ms = |f: &Forecast| self.time_left(f).as_secs_f64() * 1e3;
        let left = ms(f).max(1e-3);
        let now = Instant::now();
        let due = self
            .range
            .is_none_or(|(at, _)| now.duration_since(at) >= RANGE_EVERY);
        if due || FORECAST_MARKS.iter().any(|&m| self.mark_pending(f, m)) {
            let (least, most) = coordinator::forecast_range(policy, p, f)?;
            let end = |remaining| ms(&Forecast { remaining, ..*f }) / left;
            self.range = Some((now, [end(least), end(most)]));
        }
        self.range.map(|(_, ends)| ends.map(|e| e * left))
    }

    /// Whether progress has reached `mark` and the report has no forecast at it yet.
    fn mark_pending(&self, f: &Forecast, mark: f64) -> bool {
        f.fraction_done >= mark && !self.forecasts.iter().any(|r| r.at_fraction == mark)
    }

    /// Keeps the forecast `f` that `policy` made from `p` when progress first reaches each of
    /// [`FORECAST_MARKS`], and its range (`range`, time left in ms); and, for its hindsight,
    /// the policy and the progress it was made from and the counts the rates after it are
    /// measured from.
    fn note_forecast(
        &mut self,
        policy: &dyn Policy,
        p: &Progress,
        f: &Forecast,
        range: Option<[f64; 2]>,
    ) {
        if !f.is_known() {
            return;
        }
        let now = Instant::now();
        let elapsed_ms = now.duration_since(self.t0).as_secs_f64() * 1e3;
        for mark in FORECAST_MARKS {
            if !self.mark_pending(f, mark) {
                continue;
            }
            self.count_unthrottled(now);
            self.marks.push(Mark {
                record: self.forecasts.len(),
                policy: policy.snapshot(),
                progress: p.clone(),
                counts: self.counts(now),
                guest_speed: self.guest_speed(),
                unacked: self.tx.unacked_bytes(),
            });
            self.forecasts.push(ForecastRecord {
                at_fraction: mark,
                elapsed_ms,
                total_ms: elapsed_ms + self.time_left(f).as_secs_f64() * 1e3,
                downtime_ms: self.with_switchover(f.downtime, f.downtime).as_secs_f64() * 1e3,
                total_range_ms: range.map(|r| r.map(|left| elapsed_ms + left)),
                hindsight: None,
            });
        }
    }

    /// What the rates after each progress mark are measured from, as they stand at `now`.
    fn counts(&self, now: Instant) -> Counts {
        Counts {
            at: now,
            vcpu_ns: self.vm.vcpu_cpu_time().as_nanos() as f64,
            unthrottled_ns: self.unthrottled_ns as f64,
            delivered: self.delivered_bytes() as f64,
            wire: self.wire_bytes() as f64,
            encoded: self.shared.encoded_pages.load(Ordering::Relaxed) as f64,
        }
    }

    /// At the end of the live phase (nothing in flight), fills in each progress mark's
    /// [`Hindsight`]: the rates from the mark to now, or to the policy's first throttle or
    /// over-commit, and what the policy as it stood at the mark forecasts from them. A mark
    /// less than [`HINDSIGHT_MIN`] before either gets none.
    fn hindsight(&mut self) {
        let now = Instant::now();
        self.count_unthrottled(now);
        let end = self.counts(now);
        for mark in std::mem::take(&mut self.marks) {
            let from = mark.counts;
            // A membound tail at 0.97 raised the lanes' rate after its mark 1.47 times and
            // cut the guest's speed, as measured, to a tenth, and the policy, which priced
            // that, would have been given both again.
            let end = self.controlled.filter(|c| c.at > from.at).unwrap_or(end);
            let secs = end.at.duration_since(from.at).as_secs_f64();
            let (delivered, wire, pages) = (
                end.delivered - from.delivered,
                end.wire - from.wire,
                end.encoded - from.encoded,
            );
            if secs < HINDSIGHT_MIN.as_secs_f64() || delivered <= 0.0 || pages <= 0.0 {
                continue;
            }
            let unthrottled = end.unthrottled_ns - from.unthrottled_ns;
            let guest_speed_after = if self.probe_guest_cpu > 0.0 && unthrottled > 0.0 {
                (end.vcpu_ns - from.vcpu_ns) * 1e9 / (self.probe_guest_cpu * unthrottled)
            } else {
                mark.guest_speed
            };
            let bandwidth_after = delivered / secs;
            let bytes_per_page_after = wire / pages;
            let p = &mark.progress;
            let speed = match mark.guest_speed {
                s if s > 0.0 => guest_speed_after / s,
                _ => 1.0,
            };
            let f =
                mark.policy
                    .forecast(&p.as_it_went(speed, bandwidth_after, bytes_per_page_after));
            if !f.is_known() {
                continue;
            }
            let left = self.time_left_at(&f, mark.unacked, bandwidth_after);
            let record = &mut self.forecasts[mark.record];
            record.hindsight = Some(Hindsight {
                guest_speed: mark.guest_speed,
                guest_speed_after,
                bandwidth: p.bandwidth,
                bandwidth_after,
                bytes_per_page: p.bytes_per_page,
                bytes_per_page_after,
                total_ms: record.elapsed_ms + left.as_secs_f64() * 1e3,
            });
        }
    }

    /// One timeline point.
    fn sample(&mut self, phase: Phase, eta_ms: f64) {
        let p = self.progress();
        self.timeline.push(Sample {
            t_ms: p.elapsed.as_secs_f64() * 1e3,
            phase,
            lane_bytes: self.tx.stats().iter().map(|l| l.bytes).collect(),
            dirty_pages: p.dirty,
            hot_pages: p.hot,
            never_sent_pages: p.never_sent,
            throttle: self.controls.throttle,
            vcpu_cores: self.controls.cores,
            eta_ms,
        });
    }

    /// Marks `pages` sent and queues them for the workers, in work items of one batch.
    fn queue(&mut self, pages: &[u64]) -> Result<(), MigrateError> {
        self.queue_in(pages, self.shared.encoder.max_pages)
    }

    /// [`Self::queue`], in batches of `batch` pages.
    fn queue_in(&mut self, pages: &[u64], batch: usize) -> Result<(), MigrateError> {
        for &p in pages {
            self.sent.set(p);
        }
        self.pages_sent += pages.len() as u64;
        self.pending.extend_from_slice(pages);
        let batch = batch.max(1);
        while self.pending.len() >= batch {
            let rest = self.pending.split_off(batch);
            let work = std::mem::replace(&mut self.pending, rest);
            self.dispatch_work(work)?;
        }
        Ok(())
    }

    /// Queues whatever is pending.
    fn flush(&mut self) -> Result<(), MigrateError> {
        if !self.pending.is_empty() {
            let work = std::mem::take(&mut self.pending);
            self.dispatch_work(work)?;
        }
        Ok(())
    }

    fn dispatch_work(&mut self, mut pages: Vec<u64>) -> Result<(), MigrateError> {
        // Sorted pages let the worker re-arm them with few KVM_CLEAR_DIRTY_LOG calls.
        pages.sort_unstable();
        let Some(placement) = self.cfg.placement.as_ref().filter(|p| p.ranges.len() > 1) else {
            return self.dispatch.send(
                0,
                workers::Work {
                    pages,
                    epoch: self.epoch,
                },
            );
        };
        // Split by the node queue of each page's range, keeping address order.
        let mut start = 0;
        while start < pages.len() {
            let q = placement.queue_of(pages[start]);
            let mut end = start + 1;
            while end < pages.len() && placement.queue_of(pages[end]) == q {
                end += 1;
            }
            let work = workers::Work {
                pages: pages[start..end].to_vec(),
                epoch: self.epoch,
            };
            self.dispatch.send(q, work)?;
            start = end;
        }
        Ok(())
    }

    fn progress(&self) -> Progress {
        let now = Instant::now();
        // Read together: the workers add both when a batch is finished.
        let wire_bytes = self.wire_bytes();
        let encoded = self.shared.encoded_pages.load(Ordering::Relaxed);
        Progress {
            elapsed: now.duration_since(self.t0),
            since_harvest: now.duration_since(self.last_harvest),
            epoch: self.epoch,
            total_pages: self.sent.len(),
            never_sent: self.never_sent.count(),
            dirty: self.dirty.count() + self.hot.count(),
            hot: self.hot.count(),
            pages_sent: self.pages_sent,
            bytes_sent: wire_bytes,
            bandwidth: self.bandwidth(),
            queued: self.pages_sent.saturating_sub(encoded),
            bytes_per_page: self.bytes_per_page(wire_bytes, encoded),
            paused_bandwidth: self.probe.paused_pages
                * CodecSample::of(&self.probe.codecs, self.codec()).bpp,
            stop_batches: self.stop_batches(),
            dirtied_last_epoch: self.dirtied_last_epoch,
            held_back: self.deferred,
            unharvested: Some(self.unharvested),
            writes: self.writes.map(|m| WriteModel {
                touched: self.touched.growth.touched(),
                ..m.scaled(self.guest_speed())
            }),
            sweep_order: self.sweep_order.clone(),
            overcommit_ahead: self.overcommit_ahead(),
        }
    }

    /// What the over-commit configured and not yet in force changes once it packs the vCPUs
    /// onto its first cores: their speed falls to the share of their probe-time speed those
    /// cores give them next to the busy workers (as before the speed is measured), if lower
    /// than now; the workers get the other cores to themselves, and move what they encode on
    /// those, up to what the lanes carry. With one core of two packed, the debug log read the
    /// guest at 0.32–0.33 of the probe's speed after against 0.42–0.44 before (0.39 expected;
    /// 0.23 if it kept its share of each core), and the lanes' rate went from 103–110 MB/s to
    /// 114–119 of their 118.
    fn overcommit_ahead(&self) -> Option<Packed> {
        let o = self.cfg.policy_cfg.overcommit?;
        if self.controls.cores.is_some() {
            return None;
        }
        let cores = o.first_cores();
        let now = self.guest_speed();
        let then = self.expected_speed(Some(cores));
        let free = (self.probe.cores - cores as f64).min(self.probe.encode_cores);
        let codec = CodecSample::of(&self.probe.codecs, self.codec());
        Some(Packed {
            speed: if now > 0.0 {
                (then / now).min(1.0)
            } else {
                1.0
            },
            bandwidth: if free > 0.0 {
                (free / codec.cpu_secs.max(1e-9) * codec.bpp).min(self.probe.lane_rate)
            } else {
                0.0
            },
        })
    }

    /// Wire bytes per page over the last second, else over the `wire` bytes and `encoded`
    /// pages so far, else the probe's figure. Not the whole migration's: on `dirty-all` the
    /// last pages cost 12% more than the first second's (25% once the tuner kept LZ4), and
    /// the average caught up too slowly, the time left coming out short.
    fn bytes_per_page(&self, wire: u64, encoded: u64) -> f64 {
        let (bytes, pages) = (self.encoded.0.rate(), self.encoded.1.rate());
        if bytes > 0.0 && pages > 0.0 {
            bytes / pages
        } else if self.live_codec.is_some_and(|c| c != self.codec()) {
            // Just switched to the paused codec ([`Self::settle_codec`]).
            CodecSample::of(&self.probe.codecs, self.codec()).bpp * self.bpp_scale
        } else if encoded > 0 && wire > 0 {
            wire as f64 / encoded as f64
        } else {
            self.probe.bpp
        }
    }

    /// How fast the vCPUs run now (over the last second) against during the probe, throttle
    /// aside (policies apply their own): a guest starved of CPU by the migration writes less
    /// than the probe saw, and over-commit slows it too. Until measured, as the probe expects
    /// it to run next to the busy workers ([`Probe::busy_guest_speed`]), on the cores an
    /// over-commit leaves it ([`Self::expected_speed`]); after a change of its cores, no faster
    /// than it was measured on the ones before.
    fn guest_speed(&self) -> f64 {
        let now = self.guest_cpu.rate();
        // The share of the window the vCPUs were given: at a throttle's change, the window
        // still holds the time before it (a guest just throttled to 0.98 is not 4 × as fast).
        let free = match self.unthrottled.rate() {
            r if r > 0.0 => r / 1e9,
            _ => 1.0 - self.controls.throttle,
        };
        if self.probe_guest_cpu <= 0.0 || free <= 0.0 {
            return 1.0;
        }
        if now <= 0.0 {
            let packed = self.expected_speed(self.controls.cores);
            return self.unmeasured_speed.map_or(packed, |s| s.min(packed));
        }
        (now / (self.probe_guest_cpu * free)).clamp(0.05, 4.0)
    }

    /// How fast the probe expects the vCPUs to run next to the busy workers
    /// ([`Probe::busy_guest_speed`]) on `cores` (`None`: their own), against the probe: at
    /// most the share of their probe-time CPU those cores give ([`cores_share`]). An
    /// over-commit due later is foreseen by the policy ([`coordinator::Overcommitted`], from
    /// [`Self::overcommit_ahead`]).
    fn expected_speed(&self, cores: Option<usize>) -> f64 {
        self.probe.busy_guest_speed * cores_share(cores, self.vcpu_demand())
    }

    /// How many cores' time the vCPUs took during the probe.
    fn vcpu_demand(&self) -> f64 {
        self.probe_guest_cpu / 1e9
    }

    /// Adds the time since the last count, at the throttle in force, to `unthrottled_ns`.
    fn count_unthrottled(&mut self, now: Instant) {
        let secs = now
            .saturating_duration_since(self.unthrottled_at)
            .as_secs_f64();
        self.unthrottled_ns += (secs * (1.0 - self.controls.throttle) * 1e9) as u64;
        self.unthrottled_at = now;
    }

    fn event(&self, phase: Phase) -> ProgressEvent {
        let p = self.progress();
        ProgressEvent {
            phase,
            elapsed_ms: p.elapsed.as_secs_f64() * 1e3,
            fraction: 0.0,
            eta_ms: None,
            eta_range_ms: None,
            wire_bytes: p.bytes_sent,
            pages_sent: self.pages_sent,
            never_sent_pages: p.never_sent,
            dirty_pages: p.dirty,
            hot_pages: p.hot,
            throttle: self.controls.throttle,
            vcpu_cores: self.controls.cores,
            epoch: self.epoch,
            bytes_per_s: p.bandwidth,
            bound_ms: self.bound.map(|b| b.as_secs_f64() * 1e3),
        }
    }

    /// Delivers what is queued, the VM running: the workers finish, the pages they sent are
    /// hashed (`--verify full`), and the destination applies every batch the lanes carry
    /// (up to a window of batches per lane: tens of milliseconds on a 1 Gbit/s link, which
    /// in the downtime would delay the final pages). Returns the time the lanes took.
    fn settle(&mut self) -> Result<Duration, MigrateError> {
        self.flush()?;
        self.dispatch.drain()?;
        self.hash_live()?;
        let t = Instant::now();
        self.tx.barrier()?;
        let took = t.elapsed();
        log::debug!(
            "settled t={:.1}ms: the lanes took {:.1}ms",
            self.t0.elapsed().as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3
        );
        Ok(took)
    }

    /// With `--verify full`, hashes the pages sent and not dirty since (the policy's dirty
    /// groups go in the stop-and-copy or are resent), so that the pause hashes only what
    /// changed after. About 0.5 µs a page, against 5–25 µs to encode it.
    fn hash_live(&mut self) -> Result<(), MigrateError> {
        let Some(terms) = self.shared.live_terms else {
            return Ok(());
        };
        let (sent, dirty, hot) = (self.sent.words(), self.dirty.words(), self.hot.words());
        self.live_hash_pages += terms.sweep(self.vm.memory(), |i| sent[i] & !dirty[i] & !hot[i])?;
        Ok(())
    }

    /// Harvests the dirty log: pages already sent and written since join the dirty group.
    fn harvest(&mut self) -> Result<(), MigrateError> {
        // The drain before a harvest pauses sending: that window measures nothing.
        if let Some(c) = self.tuner.as_mut().and_then(|t| t.restart(Instant::now())) {
            log::info!("compression: back to {c}, the trial cut short by a harvest");
            self.set_codec(c);
        }
        self.take_log()?;
        self.touched.add(Instant::now(), &self.scratch);
        Ok(())
    }

    /// Takes the dirty log into the groups, for a new epoch: [`Migration::harvest`] without the
    /// write clock, which only the forecasts read. At the pause the forecasts are over, and
    /// the clock's read of the log (0.2–0.3 ms for 512 MiB here) would be downtime.
    fn take_log(&mut self) -> Result<(), MigrateError> {
        self.scratch.clear_all();
        self.shared.tracker.harvest(&mut self.scratch)?;
        if let Some(t) = self.shared.live_terms {
            t.mark_written(&self.scratch);
        }
        self.defer_written();
        self.dirtied_last_epoch = Bitmap::harvest_into(
            &self.scratch,
            &self.sent,
            &self.resent,
            &mut self.dirty,
            &mut self.hot,
        );
        self.resent.clear_all();
        self.unharvested = 0;
        self.epoch += 1;
        self.last_harvest = Instant::now();
        log::debug!(
            "harvest t={:.1}ms epoch={} dirtied={} dirty={} hot={}",
            self.t0.elapsed().as_secs_f64() * 1e3,
            self.epoch,
            self.dirtied_last_epoch,
            self.dirty.count(),
            self.hot.count()
        );
        Ok(())
    }

    /// While hot pages wait ([`Controls::defer_hot`]), never-sent pages the log shows written
    /// (in `scratch`) join them: a guest that writes a page before its first send most often
    /// writes it again after it, so that send would go again. Waiting, the page goes once, in
    /// the throttled tail or the stop-and-copy; a page written once and no more goes once
    /// either way. The live phase's bound is kept: these pages are first sends, not resends.
    fn defer_written(&mut self) {
        if self.controls.defer_hot {
            let moved = self.never_sent.move_masked(&self.scratch, &mut self.hot);
            self.deferred += moved;
        }
    }

    /// Reads the dirty log for the touched pages and those the next harvest will find, taking
    /// nothing from it.
    fn peek(&mut self) -> Result<(), MigrateError> {
        self.scratch.clear_all();
        self.shared.tracker.peek(&mut self.scratch)?;
        let now = Instant::now();
        self.touched.add(now, &self.scratch);
        self.defer_written();
        self.unharvested =
            Bitmap::count_newly_dirty(&self.scratch, &self.sent, &self.dirty, &self.hot);
        if self.writes.is_some() {
            let state = |p| {
                if self.never_sent.get(p) {
                    PageState::NeverSent
                } else if self.dirty.get(p) || self.hot.get(p) {
                    PageState::Dirty
                } else if !self.sent.get(p) {
                    PageState::Absent
                } else if self.scratch.get(p) {
                    PageState::Dirty
                } else {
                    PageState::Clean
                }
            };
            let t = &self.touched;
            let taken = now.saturating_duration_since(self.t0);
            let order = t
                .clock
                .snapshot(t.secs(now), taken, self.cursor_never, state);
            log::trace!("sweep order t={:.0}ms {order:?}", taken.as_secs_f64() * 1e3);
            self.sweep_order = Some(Arc::new(order));
        }
        Ok(())
    }

    /// Measures what the lanes carry and what the workers encode with each codec, and chooses
    /// the codec that moves the most pages per second.
    fn probe(&mut self) -> Result<Probe, MigrateError> {
        let mem = self.vm.memory();
        let span = mem.page_span();
        let step = (span / 1024).max(1);
        // Every worker encodes at once, as in the migration: with busy vCPUs on the same
        // cores, two workers get less than twice what one gets alone. Timed one at a time,
        // zstd's pages per second read 20% over what two workers moved here, and the probe
        // chose it over LZ4, which moved 25% more.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let par = self.n_workers.clamp(1, cores);
        let encoder = &self.cfg.encoder;
        let sample = |codec: Codec| -> Result<Encoded, MigrateError> {
            let parts = std::thread::scope(|s| {
                let workers: Vec<_> = (0..par as u64)
                    .map(|k| {
                        let cfg = EncoderConfig {
                            codec,
                            ..encoder.clone()
                        };
                        crate::threads::spawn(s, move || {
                            encode_sample(mem, cfg, k * step, par as u64 * step)
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("the encode probe does not panic"))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            Ok(parts.iter().fold(Encoded::default(), |a, e| Encoded {
                pages: a.pages + e.pages,
                bytes: a.bytes + e.bytes,
                timed: a.timed + e.timed,
                secs: a.secs + e.secs,
                cpu: a.cpu + e.cpu,
            }))
        };
        // Each codec is timed twice, in turn, and its lower CPU time a page kept. Its time
        // next to the vCPUs is that CPU time over the share of a core a probe thread got,
        // taken over every timing at once: the share is the scheduler's, whatever the thread
        // computes, and one timing is a few scheduler slices long. Timed on its own, zstd's
        // read 23–46 µs a page on the testbed for about 12 µs of CPU, and LZ4 won where zstd
        // moved 8–28% more pages; once, a hiccup during LZ4's single timing read it 4–6 times
        // slower, raw was chosen at 1 Gbit/s and the migration took 3.5 times as long.
        let mut timings = Vec::new();
        // Meanwhile, the vCPUs' CPU time next to busy workers.
        let (codec_guest0, codec_t0) = (self.vm.vcpu_cpu_time(), Instant::now());
        for _ in 0..CODEC_PROBE_ROUNDS {
            for (i, c) in Codec::ALL.into_iter().enumerate() {
                timings.push((i, sample(c)?));
            }
        }
        let codecs = codec_samples(&timings);
        let busy_guest_cpu = self
            .vm
            .vcpu_cpu_time()
            .saturating_sub(codec_guest0)
            .as_nanos() as f64
            / codec_t0.elapsed().as_secs_f64().max(1e-6);
        // The source's digests at switchover read all of its paused memory, at memory speed
        // rather than cache speed: time the same on the last 32 MiB of memory, away from the
        // working sets, which the guest keeps in the cache (they start at the beginning of
        // each vCPU's share). The guest may be writing them, so each page is copied out
        // first. In CPU time: the vCPUs compete for the cores now, not at switchover.
        let mut page = vec![0u8; PAGE_SIZE];
        let secs_hash = {
            let first = span.saturating_sub(HASH_PROBE_PAGES);
            let t = cpu::thread_time();
            let (mut sum, mut n) = (0u64, 0u32);
            for p in first..(first + HASH_PROBE_PAGES).min(span) {
                if mem.read(p << PAGE_SHIFT, &mut page).is_ok() {
                    sum = sum.wrapping_add(digest::page_term(p, &page));
                    n += 1;
                }
            }
            std::hint::black_box(sum);
            (cpu::thread_time() - t).as_secs_f64() / f64::from(n.max(1))
        };

        // Lane probe: 1 MiB messages the destination discards, for at most probe_time;
        // meanwhile, on another thread, the guest's writes over the same time.
        let tracker = self.shared.tracker;
        let window = self.cfg.probe_time;
        let guest0 = self.vm.vcpu_cpu_time();
        let touched = &mut self.touched;
        let (writes, sent, lane_secs) = std::thread::scope(|s| {
            let writes = crate::threads::spawn(s, || measure_writes(tracker, mem, window, touched));
            let t = Instant::now();
            let mut sent = 0u64;
            let chunk = vec![0xa5u8; 1 << 20];
            let lanes = (|| {
                while t.elapsed() < window && sent < (1 << 30) {
                    self.shared.pacer.pace(chunk.len() as u64);
                    self.tx.send(Tag::Probe as u16, chunk.clone())?;
                    sent += chunk.len() as u64;
                }
                self.tx.barrier()
            })();
            let lane_secs = t.elapsed().as_secs_f64();
            let writes = writes.join().expect("the write probe does not panic");
            lanes.map(|()| (writes, sent, lane_secs))
        })?;
        let writes = writes?;
        log::debug!(
            "write model: working set {:.0} pages at first {:.0} new/s, drift {:.0} pages/s",
            writes.wss,
            writes.rate,
            writes.drift
        );
        self.writes = Some(writes);
        // The migration takes cores from the guest: its speed is measured anew.
        self.touched.speed_changes(Instant::now());
        let guest = self.vm.vcpu_cpu_time().saturating_sub(guest0);
        self.probe_guest_cpu = guest.as_nanos() as f64 / lane_secs.max(1e-6);
        // One round trip: an empty message, acknowledged; the fastest of a few. The
        // switchover's round trips run with the vCPUs paused; running, busy vCPUs can hold
        // every core, and each wakeup on the way then waits up to a scheduler tick (4 ms
        // against 0.1 ms on this project's 2-core machines). So they are timed with the vCPUs
        // paused too, for about a millisecond (`probe.pause_ms`), after one running (which
        // also waits out whatever the probe's last bytes left in a shaped link).
        let ping = || -> Result<Duration, MigrateError> {
            let t = Instant::now();
            self.tx.send(Tag::Probe as u16, Vec::new())?;
            self.tx.barrier()?;
            Ok(t.elapsed())
        };
        ping()?;
        let paused = Instant::now();
        self.vm.pause()?;
        let guard = PauseGuard {
            vm: self.vm,
            armed: true,
        };
        let round_trip = (0..ROUND_TRIPS)
            .try_fold(Duration::MAX, |m, _| Ok::<_, MigrateError>(m.min(ping()?)))?;
        drop(guard);
        let pause = paused.elapsed();
        let mut lane_rate = sent as f64 / lane_secs.max(1e-6);
        if let Some(cap) = self.cfg.max_bandwidth {
            lane_rate = lane_rate.min(cap);
        }

        // The codec that moves the most pages per second with the vCPUs running, and with them
        // stopped (the stop-and-copy) or mostly throttled.
        let par = par as f64;
        let pages = |s: CodecSample| s.pages(par, lane_rate, false);
        let best = |paused| match self.cfg.compress {
            CompressMode::Fixed(c) => c,
            CompressMode::Auto => fastest(&codecs, |s| s.pages(par, lane_rate, paused)),
        };
        let (codec, paused_codec) = (best(false), best(true));
        let chosen = CodecSample::of(&codecs, codec);
        // The workers are busy for the share of the time the lanes leave them; meanwhile the
        // vCPUs run as they did in the codec probe.
        let busy = (pages(chosen) * chosen.secs / par).clamp(0.0, 1.0);
        let kept = if self.probe_guest_cpu > 0.0 {
            (busy_guest_cpu / self.probe_guest_cpu).clamp(0.05, 1.0)
        } else {
            1.0
        };
        Ok(Probe {
            lane_rate,
            codecs,
            encode_cores: par,
            cores: cores as f64,
            codec,
            rate: pages(chosen) * chosen.bpp,
            bpp: chosen.bpp,
            paused_codec,
            paused_pages: CodecSample::of(&codecs, paused_codec)
                .pages(par, lane_rate, true)
                .max(pages(chosen)),
            secs_hash,
            round_trip,
            pause,
            busy_guest_speed: 1.0 - busy * (1.0 - kept),
        })
    }

    /// How long one side takes to hash the pages `--verify` compares (on as many threads as
    /// there are cores for them).
    fn hash_time(&self) -> Duration {
        let mem = self.vm.memory();
        let hashed = match self.cfg.verify {
            // Only the stop-and-copy's pages: they are hashed while they travel, each far
            // faster than it is sent.
            VerifyMode::Full => 0.0,
            mode => (mem.size() / PAGE_SIZE as u64) as f64 * mode.share(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = self.cfg.digest_threads.clamp(1, cores) as f64;
        Duration::from_secs_f64(hashed * self.probe.secs_hash / threads)
    }

    /// Fails fast if the destination has reported a failure.
    fn check_destination(&mut self) -> Result<(), MigrateError> {
        match self.tx.recv_reply(Duration::ZERO) {
            Err(e) if e.is_timeout() => Ok(()),
            Err(e) => Err(e.into()),
            Ok((tag, payload)) => Err(unexpected_reply(tag, &payload)),
        }
    }

    /// Waits for the destination's reply `want`.
    fn expect_reply(&mut self, want: Tag) -> Result<Vec<u8>, MigrateError> {
        self.recv_reply(want, self.cfg.reply_timeout)
    }

    /// The next reply of the destination, which must be `want`, waited for at most `timeout`.
    fn recv_reply(&mut self, want: Tag, timeout: Duration) -> Result<Vec<u8>, MigrateError> {
        let (tag, payload) = self.tx.recv_reply(timeout)?;
        if tag == want as u16 {
            return Ok(payload);
        }
        Err(unexpected_reply(tag, &payload))
    }
}

/// How long the source waits for `Ready`: the reply timeout, plus 2 s per GiB of guest memory
/// for the destination to allocate it first ([`crate::dest::DestConfig::prealloc`]; 0.5–1.5 s
/// per GiB on one thread here), so that a large guest on a host of few cores does not time
/// out before a page is sent.
fn ready_timeout(reply_timeout: Duration, memory_bytes: u64) -> Duration {
    reply_timeout + Duration::from_secs_f64(2.0 * memory_bytes as f64 / coordinator::GIB)
}

fn unexpected_reply(tag: u16, payload: &[u8]) -> MigrateError {
    match Tag::from_u16(tag) {
        Some(Tag::Failed) => MigrateError::Destination(String::from_utf8_lossy(payload).into()),
        Some(t) => MigrateError::Proto(proto::ProtoError::Unexpected {
            tag: t,
            state: "here on the source",
        }),
        None => MigrateError::Proto(proto::ProtoError::UnknownTag(tag)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait for `Ready` grows with the memory the destination allocates first.
    #[test]
    fn ready_waits_longer_for_more_memory() {
        let reply = Duration::from_secs(60);
        assert_eq!(ready_timeout(reply, 0), reply);
        assert_eq!(
            ready_timeout(reply, 64 << 30),
            Duration::from_secs(60 + 128)
        );
        assert!(ready_timeout(reply, 1 << 40) > Duration::from_secs(2048));
    }

    /// A probe thread counts every page it reads in the wire bytes, but times only those
    /// past its first [`PROBE_WARM_PAGES`]; a share no longer than that is timed whole.
    #[test]
    fn a_probe_thread_times_its_pages_past_the_warm_up() {
        let mem = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        let cfg = EncoderConfig::default;
        let all = encode_sample(&mem, cfg(), 0, 1).unwrap();
        assert_eq!(all.pages, 256);
        assert_eq!(all.timed, 256 - PROBE_WARM_PAGES);
        assert!(all.bytes > 0);
        let short = encode_sample(&mem, cfg(), 0, 8).unwrap();
        assert_eq!((short.pages, short.timed), (32, 32));
        let rest = encode_sample(&mem, cfg(), 3, 2).unwrap();
        assert_eq!(rest.pages, 127, "pages 3, 5, …, 255");
        assert_eq!(rest.timed, 127 - PROBE_WARM_PAGES);
    }

    /// The share of a core the probe's threads got is taken over all the timings: one timing
    /// that waited slices more than the others does not make its codec look slow.
    #[test]
    fn a_codec_timed_through_a_hiccup_is_not_taken_for_slow() {
        let timing = |cpu_us: u64, wall_us: u64| Encoded {
            pages: 1000,
            bytes: 1000 * 2048,
            timed: 1000,
            secs: Duration::from_micros(1000 * wall_us),
            cpu: Duration::from_micros(1000 * cpu_us),
        };
        // zstd 12 µs a page of CPU, LZ4 7, raw 2, each at half a core; the first LZ4 timing
        // waited three times as long.
        let timings = [
            (0, timing(12, 24)),
            (1, timing(7, 42)),
            (2, timing(2, 4)),
            (0, timing(13, 26)),
            (1, timing(8, 16)),
            (2, timing(2, 4)),
        ];
        let s = codec_samples(&timings);
        assert_eq!(
            s.map(|s| s.cpu_secs * 1e6),
            [12.0, 7.0, 2.0],
            "the lower CPU time"
        );
        let share = (12 + 7 + 2 + 13 + 8 + 2) as f64 / (24 + 42 + 4 + 26 + 16 + 4) as f64;
        for (i, s) in s.iter().enumerate() {
            assert!((s.secs * share - s.cpu_secs).abs() < 1e-12, "codec {i}");
        }
        assert!(s[1].secs < s[0].secs, "LZ4 still faster than zstd");
        assert_eq!(s[0].bpp, 2048.0);
    }

    /// Next to busy vCPUs the workers are the limit and LZ4 moves the most pages; with the
    /// vCPUs stopped they encode at their CPU time's rate, the lanes are the limit, and zstd's
    /// smaller pages win. Figures like the testbed's: 2 workers, 1 Gbit/s.
    #[test]
    fn the_codec_with_the_cores_free_can_differ_from_the_live_one() {
        let sample = |bpp, us, cpu_us| CodecSample {
            bpp,
            secs: us * 1e-6,
            cpu_secs: cpu_us * 1e-6,
        };
        let codecs = [
            sample(1624.0, 40.0, 13.0),
            sample(2061.0, 16.0, 8.0),
            sample(3092.0, 1.5, 1.4),
        ];
        let (workers, lane) = (2.0, 125e6);
        let live = fastest(&codecs, |s| s.pages(workers, lane, false));
        let paused = fastest(&codecs, |s| s.pages(workers, lane, true));
        assert_eq!((live, paused), (Codec::Lz4, Codec::Zstd));
        // zstd paused: the lanes' 77k pages/s, not the workers' 154k; live: the workers' 50k.
        let zstd = codecs[0];
        assert!((zstd.pages(workers, lane, true) - lane / 1624.0).abs() < 1.0);
        assert!((zstd.pages(workers, lane, false) - 50e3).abs() < 1.0);
        // On loopback (no lane limit) raw wins either way.
        let fast = 1e12;
        assert_eq!(
            fastest(&codecs, |s| s.pages(workers, fast, true)),
            Codec::Raw
        );
    }
}
