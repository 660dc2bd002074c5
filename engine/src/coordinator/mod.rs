//! The coordinator: migration policies as plain state machines (STYLE 1).
//!
//! The executor runs the migration (harvests dirty logs, encodes and sends pages) and, between
//! steps, asks the policy what to do next, passing what it measured ([`Progress`]). The policy
//! answers with a [`Decision`], and says through [`Policy::controls`] what it wants done to the
//! vCPUs meanwhile (a throttle, an over-commit, hot pages deferred); it never touches memory,
//! sockets or clocks itself, so it is tested with a virtual clock and simulated bandwidth and
//! dirty rates ([`sim`]).
//!
//! The policies:
//!
//! - [`Mplm`] — memory-bound pre-copy exactly as Chanchio & Yaothanee describe it. No downtime
//!   knob: the never-sent and dirty groups are multiplexed in 50/50 cycles, and the live phase
//!   ends exactly when the never-sent group is empty. Total time bounded by the memory size
//!   whatever the dirty rate (see [`bound`]).
//! - [`Membound`] — the default: MPLM's guarantee with lower downtime. Hot pages (written again
//!   within an epoch of being resent, and never-sent pages written before their first send)
//!   are deferred to the stop-and-copy, the dirty share of a
//!   cycle follows the measured dirty rate, and when the downtime forecast exceeds
//!   `target_downtime` a throttled tail resends the dirty set within MPLM's resend budget.
//! - `timebound` ([`Mplm::timebound`]) — TLM: a mass transfer sends all memory once in address order while a small
//!   share of each cycle resends pages dirtied since they were sent (harvested every
//!   `timebound_epoch`); the VM stops when the mass transfer ends. About 2 × memory ÷ bandwidth.
//! - [`Precopy`] — classic iterative pre-copy, the baseline: a first pass over all memory, then
//!   passes over the dirty set until the estimated downtime fits `max_downtime`, or a limit
//!   (`max_epochs`, `timeout`) forces the switchover or an abort.
//! - [`Autoconverge`] — precopy with QEMU's auto-converge: vCPUs throttled from 20% in 10%
//!   steps (at most 99%) while the guest dirties more than half of what an epoch sends.
//!
//! Any of them can be wrapped in CPU over-commit ([`Overcommit`]): past a progress mark the
//! vCPU threads are packed onto fewer cores, and given their own affinity back at switchover.
//!
//! ## Contract with the executor
//!
//! - `Send { never_sent, dirty }`: send at most `never_sent` never-sent pages and at most `dirty`
//!   dirty pages (fewer if fewer exist), then ask again. Dirty pages are taken from the cold
//!   ones first; hot ones only while [`Controls::defer_hot`] is off. The bound assumes the
//!   executor never sends more than it is asked to.
//! - `Harvest`: harvest (and clear) the dirty log; pages sent and written since move into the
//!   dirty group (hot if they were resent during the epoch that just ended); `epoch` goes up by
//!   one and `since_harvest` restarts.
//! - `Switchover`: lift any throttle and over-commit, pause the VM, harvest once more, send
//!   every dirty page (the stop-and-copy), drain the lanes, compare digests, send the
//!   vCPU/device state, resume on the destination. No policy returns it while `never_sent > 0`.
//! - `Abort(reason)`: give up and keep the VM running (unthrottled) on the source.
//! - After every decision the executor reads [`Policy::controls`] and applies what changed.

mod autoconverge;
mod membound;
mod mplm;
mod overcommit;
mod precopy;
pub mod sim;
mod sweep;
mod writes;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::encode::{BATCH_HEADER_LEN, RECORD_HEADER_LEN};
use crate::memory::PAGE_SIZE;

pub use autoconverge::Autoconverge;
pub use membound::Membound;
pub use mplm::Mplm;
pub use overcommit::{cores_share, Overcommit, Overcommitted};
pub use precopy::Precopy;
use sweep::SweptPage;
pub use sweep::{PageState, SweepOrder, WriteClock};
pub use writes::{Touched, TouchedGrowth, WriteModel, Writes};

/// Wire bytes of one page in the worst case: a raw page, its record header and (for a batch of
/// one page) the batch header. The encoder never emits a larger record: a page that zstd does
/// not shrink is sent raw.
pub const WORST_WIRE_BYTES_PER_PAGE: u64 =
    (PAGE_SIZE + RECORD_HEADER_LEN + BATCH_HEADER_LEN) as u64;

/// How often the executor asks the policy for a forecast (reading the dirty log for it).
pub const FORECAST_EVERY: Duration = Duration::from_millis(100);

/// Bytes in a GiB.
pub(crate) const GIB: f64 = (1u64 << 30) as f64;

/// What the executor measured, passed to [`Policy::decide`] before every decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Time since the migration started (virtual in tests).
    pub elapsed: Duration,
    /// Time since the last dirty-log harvest (or since the start if none yet).
    pub since_harvest: Duration,
    /// Harvests done so far (0 = none yet).
    pub epoch: u32,
    /// Guest pages in total.
    pub total_pages: u64,
    /// Pages never sent yet.
    pub never_sent: u64,
    /// Pages sent and dirtied since, as of the last harvest, minus those resent since; and
    /// never-sent pages held back with the hot ones ([`Controls::defer_hot`]).
    pub dirty: u64,
    /// Of the `dirty` pages, the hot ones: written again within an epoch of being resent, or
    /// written before their first send and held back.
    pub hot: u64,
    /// Pages sent so far (first sends and resends), counted when they are handed to the
    /// executor's workers.
    pub pages_sent: u64,
    /// Of those, the pages not encoded yet (in the workers' queues): still to go on the wire.
    pub queued: u64,
    /// Wire bytes sent so far.
    pub bytes_sent: u64,
    /// Measured wire bytes per second over a recent window; 0 if unknown yet.
    pub bandwidth: f64,
    /// Measured wire bytes per page sent (after compression); 0 if unknown yet.
    pub bytes_per_page: f64,
    /// Wire bytes per second the workers and lanes carry with the vCPUs stopped, as the
    /// executor's probe measured them: the lower of what the workers encode and what the lanes
    /// carry. Running vCPUs take cores from the workers, so the stop-and-copy can go faster
    /// than the live phase's `bandwidth` (never slower). 0 if unknown: the stop-and-copy is
    /// then forecast at `bandwidth`.
    pub paused_bandwidth: f64,
    /// How the stop-and-copy's pages are batched: its first batch is encoded before any of it
    /// travels.
    pub stop_batches: StopBatches,
    /// Pages newly put in the dirty group by the last harvest.
    pub dirtied_last_epoch: u64,
    /// Never-sent pages held back with the hot ones so far ([`Controls::defer_hot`]).
    pub held_back: u64,
    /// Sent pages in neither dirty group that the dirty log showed written when it was last
    /// read (the executor reads it at each forecast, taking nothing from it): pages the next
    /// harvest will put in the dirty group. `None` if the log is not read between harvests
    /// (forecasts then model the writes since the last harvest too).
    pub unharvested: Option<u64>,
    /// How many distinct pages the guest writes in a given time at its current speed, throttle
    /// aside (policies apply their own); `None` if the executor has no such measurement
    /// (forecasts then extrapolate the dirty rate of the last epochs).
    pub writes: Option<WriteModel>,
    /// Where a sample of the pages and the guest stand in a sweep's order, if the executor
    /// follows the dirty log: where a sweeping guest's next writes fall ([`SweepOrder`]).
    pub sweep_order: Option<Arc<SweepOrder>>,
    /// What an over-commit not yet in force changes once it begins, as the executor expects
    /// it; `None` if none is pending.
    pub overcommit_ahead: Option<Packed>,
}

/// The guest and the lanes once an over-commit packs the vCPUs onto fewer cores
/// ([`Progress::overcommit_ahead`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Packed {
    /// The guest's speed then, against now.
    pub speed: f64,
    /// Wire bytes per second the lanes carry then; 0 if as now.
    pub bandwidth: f64,
}

/// How the executor hands the stop-and-copy's pages to the workers: in batches, each encoded
/// whole by one worker before it is sent. The first batch is encoded before any page
/// travels: 256 pages of zstd take a worker 3.3 ms on the testbed, as long as they take on a
/// 1 Gbit/s link. A small stop-and-copy is cut into smaller batches, a few for each worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StopBatches {
    /// Workers encoding at once.
    pub workers: usize,
    /// The most pages in a batch.
    pub max_pages: usize,
    /// Seconds a worker takes to encode a page with a core to itself; 0 if unknown.
    pub encode_page_time: f64,
}

/// Batches for each worker in a stop-and-copy smaller than [`StopBatches::max_pages`] allows.
const STOP_BATCHES_PER_WORKER: usize = 4;

/// The fewest pages in a stop-and-copy batch: smaller ones cost more in headers and
/// acknowledgements than the wait they save.
const MIN_STOP_BATCH: usize = 16;

impl StopBatches {
    /// Pages per batch for a stop-and-copy of `pages`.
    pub fn batch(&self, pages: u64) -> usize {
        let per = usize::try_from(pages)
            .unwrap_or(usize::MAX)
            .div_ceil(STOP_BATCHES_PER_WORKER * self.workers.max(1));
        per.max(MIN_STOP_BATCH).min(self.max_pages.max(1))
    }

    /// Seconds before the first of a stop-and-copy of `pages` travels: its batch's encoding.
    pub fn fill(&self, pages: f64) -> f64 {
        if pages.is_nan() || pages <= 0.0 {
            return 0.0;
        }
        let batch = self.batch(pages.ceil() as u64) as f64;
        batch.min(pages) * self.encode_page_time.max(0.0)
    }
}

impl Progress {
    /// Pages in the write model's working set; 0 without a model.
    fn working_set(&self) -> f64 {
        self.writes.map_or(0.0, |m| m.working_set())
    }

    /// Seconds from the start to the last harvest.
    fn harvested_at(&self) -> f64 {
        self.elapsed
            .saturating_sub(self.since_harvest)
            .as_secs_f64()
    }

    /// The same progress with the rates that came after it: the guest `speed` times as fast as
    /// measured (its write model, touched pages' growth and sweeps), the lanes carrying
    /// `bandwidth` wire bytes/s of `bytes_per_page` while the VM runs, under the same controls
    /// (an over-commit ahead still foreseen). A forecast from it is what the policy's model
    /// would have forecast had it known the rates: what a forecast missed by splits into its
    /// model's error and the rates' ([`crate::report::Hindsight`]).
    pub fn as_it_went(&self, speed: f64, bandwidth: f64, bytes_per_page: f64) -> Self {
        // An over-commit ahead slows the guest to a share of its speed as measured: the speed
        // expected of the packed guest stays what it was.
        let overcommit_ahead = self.overcommit_ahead.map(|a| Packed {
            speed: if speed > 0.0 {
                (a.speed / speed).min(1.0)
            } else {
                a.speed
            },
            ..a
        });
        Self {
            bandwidth,
            bytes_per_page,
            overcommit_ahead,
            ..self.at_speed(speed)
        }
    }

    /// The same measures for a guest running `speed` times as fast ([`Self::at_speed`]) over
    /// lanes carrying `bandwidth` times as much, live and paused.
    fn at_rates(&self, speed: f64, bandwidth: f64) -> Self {
        Self {
            bandwidth: self.bandwidth * bandwidth,
            paused_bandwidth: self.paused_bandwidth * bandwidth,
            ..self.at_speed(speed)
        }
    }

    /// The same measures for a guest running `speed` times as fast: the write model, the
    /// touched pages' growth and the sweeps' speeds.
    fn at_speed(&self, speed: f64) -> Self {
        let writes = self.writes.map(|m| WriteModel {
            touched: m.touched.map(|t| Touched {
                rate: t.rate * speed,
                ..t
            }),
            ..m.scaled(speed)
        });
        let sweep_order = self.sweep_order.as_ref().map(|o| {
            let mut o = SweepOrder::clone(o);
            for part in std::iter::once(&mut o.whole).chain(o.parts.iter_mut()) {
                part.speed *= speed;
            }
            Arc::new(o)
        });
        Self {
            writes,
            sweep_order,
            ..self.clone()
        }
    }
}

/// What the executor should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send up to `never_sent` never-sent pages and up to `dirty` dirty pages, then ask again.
    Send { never_sent: u64, dirty: u64 },
    /// Harvest the dirty log (starts a new epoch), then ask again.
    Harvest,
    /// End the live phase: pause, harvest, send every dirty page, resume on the destination.
    Switchover,
    /// Give up; the VM keeps running on the source. The string says why.
    Abort(String),
}

/// What a policy wants done while it runs, read by the executor after every decision.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Controls {
    /// Share of vCPU time taken away (0 = none, at most 0.99).
    pub throttle: f64,
    /// Pack the vCPU threads onto this many cores (CPU over-commit); `None`: their own
    /// affinity.
    pub cores: Option<usize>,
    /// Send no hot page while live: they wait for the stop-and-copy. Never-sent pages the
    /// dirty log shows written join them: their first send would most often go again.
    pub defer_hot: bool,
}

/// A policy's view of what is left, for progress bars, reports and schedulers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Expected time until the VM runs on the destination (live phase left + downtime).
    /// [`Duration::MAX`] while the bandwidth is unknown.
    pub remaining: Duration,
    /// Expected downtime of the stop-and-copy at this policy's switchover, as forecast now
    /// (page transfer only: the fixed switchover costs are not included). For precopy after
    /// its first pass, this is the quantity it compares to `max_downtime`: the downtime if it
    /// switched over now. [`Duration::MAX`] while the bandwidth is unknown.
    pub downtime: Duration,
    /// Fraction of the expected page transfers done, in `[0, 1]`.
    pub fraction_done: f64,
}

impl Forecast {
    /// Whether the forecast has numbers (the bandwidth was known).
    pub fn is_known(&self) -> bool {
        self.remaining != Duration::MAX
    }
}

/// How much slower or faster than measured the guest may write over the rest of a migration,
/// for the range of a forecast ([`forecast_range`]). In one `dirty-all` precopy over
/// 1 Gbit/s the debug log read the guest at 0.34 of the probe's speed when the first pass
/// ended and at 0.43 in the dirty passes after it (+26%).
pub const SPEED_SPREAD: f64 = 0.25;

/// How much more or less than measured the lanes may carry, for the same range. The same log
/// read them at 98–115 MB/s (±8%).
pub const BANDWIDTH_SPREAD: f64 = 0.1;

/// The least and most time left that `policy` forecasts from `p` if the guest writes
/// [`SPEED_SPREAD`] slower and the lanes carry [`BANDWIDTH_SPREAD`] more than measured, or the
/// other way round, with `f`, its forecast as measured, in between; `None` while the
/// forecast is unknown. A policy that iterates forecasts a wide range near its threshold:
/// precopy's passes each leave dirty the share `r` of their pages that the guest rewrites,
/// so the passes left are ln(pages that fit ÷ dirty pages) ÷ ln r: at r = 0.87, with 1.5 ×
/// the pages that fit dirty, three passes remain; a guest 5% faster makes them four or five,
/// 5% slower two. The bounded policies send each page a bounded number of times, and their
/// range follows mostly the lanes.
pub fn forecast_range(
    policy: &dyn Policy,
    p: &Progress,
    f: &Forecast,
) -> Option<(Duration, Duration)> {
    let stray =
        |speed: f64, bandwidth: f64| policy.forecast(&p.at_rates(speed, bandwidth)).remaining;
    let a = stray(1.0 - SPEED_SPREAD, 1.0 + BANDWIDTH_SPREAD);
    let b = stray(1.0 + SPEED_SPREAD, 1.0 - BANDWIDTH_SPREAD);
    let known = [a, b, f.remaining].iter().all(|&d| d != Duration::MAX);
    known.then(|| (a.min(b).min(f.remaining), a.max(b).max(f.remaining)))
}

/// A migration policy: a state machine fed with [`Progress`], answering [`Decision`]s.
pub trait Policy: Send {
    /// Short name, as accepted by [`PolicyKind::from_str`].
    fn name(&self) -> &'static str;
    /// Decides the next step from what the executor measured.
    fn decide(&mut self, p: &Progress) -> Decision;
    /// Forecasts what is left, from this policy's own model.
    fn forecast(&self, p: &Progress) -> Forecast;
    /// The policy as it stands now, to forecast from later (the report's hindsight at each
    /// progress mark).
    fn snapshot(&self) -> Box<dyn Policy>;
    /// Whether a limit (`timeout`, or `max_epochs` for precopy) has forced the policy's hand
    /// (a switchover before convergence, a hurried live phase, or an abort). The report calls
    /// a migration that completed without this "converged".
    fn limit_reached(&self) -> bool {
        false
    }
    /// What the executor should do to the vCPUs and the dirty group until the next decision.
    fn controls(&self) -> Controls {
        Controls::default()
    }
}

/// What to do when a limit (`max_epochs`, `timeout`) is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    /// Switch over anyway (the downtime may exceed `max_downtime`).
    #[default]
    Switchover,
    /// Abort the migration; the VM keeps running on the source.
    Abort,
}

/// Tuning of the policies (STYLE 16). Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// Pages per decision (one multiplexing cycle for membound, one chunk for precopy).
    /// Default 100. Values below 1 are treated as 1.
    pub cycle_pages: u64,
    /// Mplm: share of each cycle given to dirty pages once the first harvest is done; the rest
    /// goes to never-sent pages. Membound: the largest share its adaptive split may give.
    /// Default 0.5 (MPLM's 50/50). Clamped so that at least one page per cycle is a never-sent
    /// one (else the live phase would never end).
    pub dirty_share: f64,
    /// Mplm and membound: time between dirty-log harvests during the live phase. Default 3 s.
    pub epoch: Duration,
    /// Membound: the downtime (page transfer) above which the tail of the live phase throttles
    /// the vCPUs and resends the dirty set. Default 20 ms.
    pub target_downtime: Duration,
    /// Timebound: time between dirty-log harvests. Default 1 s.
    pub timebound_epoch: Duration,
    /// Timebound: share of each cycle the dirty-page sender gets next to the mass transfer.
    /// Default 0.2 (bound: `2.25 × N` pages).
    pub timebound_dirty_share: f64,
    /// Autoconverge: throttle when pages dirtied in an epoch exceed this share of the pages
    /// sent in it, two epochs in a row. Default 0.5 (QEMU's `throttle-trigger-threshold`).
    pub throttle_trigger: f64,
    /// Autoconverge: the first throttle. Default 0.2 (QEMU's `cpu-throttle-initial`).
    pub throttle_initial: f64,
    /// Autoconverge: added at each later step. Default 0.1 (`cpu-throttle-increment`).
    pub throttle_step: f64,
    /// Autoconverge: the most. Default 0.99 (QEMU's maximum).
    pub throttle_max: f64,
    /// CPU over-commit of the vCPU threads during the live phase. Default none.
    pub overcommit: Option<Overcommit>,
    /// Precopy: switch over once the dirty set would take at most this long to send.
    /// Default 300 ms. Membound has no downtime knob and ignores it.
    pub max_downtime: Duration,
    /// Precopy: the most harvests before [`on_limit`](Self::on_limit) applies. Default 30.
    /// Membound ignores it (its time is bounded anyway).
    pub max_epochs: u32,
    /// Both: once the migration has run this long, [`on_limit`](Self::on_limit) applies
    /// (membound then sends only never-sent pages so the live phase ends as soon as possible,
    /// or aborts). Default none.
    pub timeout: Option<Duration>,
    /// What a limit does. Default [`OnLimit::Switchover`].
    pub on_limit: OnLimit,
    /// Bound: fixed allowance for what is not page transfer (handshake, harvest calls, vCPU and
    /// device state, lane drain and acknowledgements, resume). Default 2 s.
    pub bound_fixed: Duration,
    /// Bound: allowance per GiB of guest memory, for the final digest comparison (`--verify
    /// full` hashes all memory on both sides) and dirty-log harvests. Default 1 s per GiB.
    pub bound_per_gib: Duration,
    /// Bound: factor on the page-transfer time, for framing, acknowledgements and bandwidth
    /// jitter around the measured rate. Default 1.10.
    pub bound_slack: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            cycle_pages: 100,
            dirty_share: 0.5,
            epoch: Duration::from_secs(3),
            target_downtime: Duration::from_millis(20),
            timebound_epoch: Duration::from_secs(1),
            timebound_dirty_share: 0.2,
            throttle_trigger: 0.5,
            throttle_initial: 0.2,
            throttle_step: 0.1,
            throttle_max: 0.99,
            overcommit: None,
            max_downtime: Duration::from_millis(300),
            max_epochs: 30,
            timeout: None,
            on_limit: OnLimit::Switchover,
            bound_fixed: Duration::from_secs(2),
            bound_per_gib: Duration::from_secs(1),
            bound_slack: 1.10,
        }
    }
}

/// A [`PolicyConfig`] value that makes no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("cycle_pages must be at least 1")]
    CyclePages,
    #[error("dirty_share must be in [0, 1), got {0}")]
    DirtyShare(f64),
    #[error("epoch must be longer than zero")]
    Epoch,
    #[error("bound_slack must be a finite number >= 1, got {0}")]
    BoundSlack(f64),
    #[error("timebound_dirty_share must be in [0, 1), got {0}")]
    TimeboundShare(f64),
    #[error("throttle values must be in [0, 0.99] with initial <= max, got initial {initial}, step {step}, max {max}")]
    Throttle { initial: f64, step: f64, max: f64 },
    #[error("over-commit needs at least 1 core and a progress mark in [0, 1]")]
    Overcommit,
}

impl PolicyConfig {
    /// Checks the values an operator may get wrong. The policies also work (clamping) with an
    /// unchecked config; this is for the CLI to report a clear error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cycle_pages == 0 {
            return Err(ConfigError::CyclePages);
        }
        if !(0.0..1.0).contains(&self.dirty_share) {
            return Err(ConfigError::DirtyShare(self.dirty_share));
        }
        if self.epoch.is_zero() {
            return Err(ConfigError::Epoch);
        }
        if !(self.bound_slack.is_finite() && self.bound_slack >= 1.0) {
            return Err(ConfigError::BoundSlack(self.bound_slack));
        }
        if !(0.0..1.0).contains(&self.timebound_dirty_share) {
            return Err(ConfigError::TimeboundShare(self.timebound_dirty_share));
        }
        let in_range = |v: f64| (0.0..=crate::vm::MAX_THROTTLE).contains(&v);
        if !(in_range(self.throttle_initial)
            && in_range(self.throttle_step)
            && in_range(self.throttle_max)
            && self.throttle_initial <= self.throttle_max)
        {
            return Err(ConfigError::Throttle {
                initial: self.throttle_initial,
                step: self.throttle_step,
                max: self.throttle_max,
            });
        }
        if let Some(o) = &self.overcommit {
            if o.cores == 0 || !(0.0..=1.0).contains(&o.at) {
                return Err(ConfigError::Overcommit);
            }
        }
        Ok(())
    }

    /// Pages per cycle, at least 1.
    fn cycle(&self) -> u64 {
        self.cycle_pages.max(1)
    }

    /// Mplm's split of a cycle (membound's largest): `(dirty quota, never-sent quota)`, the
    /// never-sent quota being at least 1.
    fn split(&self) -> (u64, u64) {
        self.split_at(self.dirty_share)
    }

    /// The split of a cycle giving `share` to dirty pages: `(dirty quota, never-sent quota)`,
    /// the never-sent quota being at least 1.
    fn split_at(&self, share: f64) -> (u64, u64) {
        let cycle = self.cycle();
        let share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let q_dirty = ((cycle as f64 * share).round() as u64).min(cycle - 1);
        (q_dirty, cycle - q_dirty)
    }

    fn timed_out(&self, p: &Progress) -> bool {
        self.timeout.is_some_and(|t| p.elapsed > t)
    }
}

/// The policies ferry implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Memory-bound pre-copy with hot-page deferral, an adaptive split and a throttled tail;
    /// the default.
    #[default]
    Membound,
    /// Memory-bound pre-copy exactly as published (MPLM).
    Mplm,
    /// Time-bound migration (TLM): mass transfer plus a concurrent dirty-page sender.
    Timebound,
    /// Classic iterative pre-copy with a downtime target.
    Precopy,
    /// Precopy with QEMU's auto-converge vCPU throttling.
    Autoconverge,
}

impl PolicyKind {
    /// Every policy, in the order of the docs.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Membound,
        PolicyKind::Mplm,
        PolicyKind::Timebound,
        PolicyKind::Precopy,
        PolicyKind::Autoconverge,
    ];

    /// The name used on the command line, in config files and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Membound => "membound",
            PolicyKind::Mplm => "mplm",
            PolicyKind::Timebound => "timebound",
            PolicyKind::Precopy => "precopy",
            PolicyKind::Autoconverge => "autoconverge",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?} (expected membound, mplm, timebound, precopy or autoconverge)")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// Builds a fresh policy of the given kind, wrapped in over-commit if the config asks for it.
pub fn make_policy(kind: PolicyKind, cfg: &PolicyConfig) -> Box<dyn Policy> {
    let inner: Box<dyn Policy> = match kind {
        PolicyKind::Membound => Box::new(Membound::new(cfg.clone())),
        PolicyKind::Mplm => Box::new(Mplm::new(cfg.clone())),
        PolicyKind::Timebound => Box::new(Mplm::timebound(cfg.clone())),
        PolicyKind::Precopy => Box::new(Precopy::new(cfg.clone())),
        PolicyKind::Autoconverge => Box::new(Autoconverge::new(cfg.clone())),
    };
    match cfg.overcommit {
        Some(o) => Box::new(Overcommitted::new(inner, o)),
        None => inner,
    }
}

/// The most pages a migration of `total_pages` pages sends under this policy (live phase and
/// stop-and-copy), or `None` if the policy makes no such promise. See [`bound`] for the
/// derivation.
pub fn bound_pages(kind: PolicyKind, total_pages: u64, cfg: &PolicyConfig) -> Option<u64> {
    let n = total_pages;
    match kind {
        PolicyKind::Membound | PolicyKind::Mplm => Some(
            n.saturating_add(resend_budget(n, cfg.split()))
                .saturating_add(n),
        ),
        PolicyKind::Timebound => Some(
            n.saturating_add(resend_budget(n, cfg.split_at(cfg.timebound_dirty_share)))
                .saturating_add(n),
        ),
        PolicyKind::Precopy | PolicyKind::Autoconverge => match cfg.on_limit {
            OnLimit::Abort => None,
            OnLimit::Switchover => {
                let passes = u64::from(cfg.max_epochs.max(1)) + 1;
                Some(n.saturating_mul(passes))
            }
        },
    }
}

/// The time ferry promises before it starts: by then the VM runs on the destination. `None`
/// when there is no bound (the bandwidth is unknown, or the policy may abort before it
/// completes).
///
/// `bandwidth` is the rate the whole pipeline sustains in wire bytes/s: the measured lane
/// bandwidth, or the encoders' throughput if that is lower. `bytes_per_page` is the wire cost of
/// a page; pass 0 (unknown) to use the worst case ([`WORST_WIRE_BYTES_PER_PAGE`], a raw page
/// with its headers), which makes the promise hold whatever the guest writes. A measured
/// compression ratio holds only as long as the content stays as compressible.
///
/// `bound = pages × bytes_per_page / bandwidth × bound_slack + bound_fixed + bound_per_gib ×
/// GiB`, where `pages` is [`bound_pages`]:
///
/// ## Mplm and membound
///
/// Let `N` be the number of guest pages, `c` = `cycle_pages`, `q_d` = round(`c` ×
/// `dirty_share`) the dirty quota of a cycle and `q_n = c − q_d ≥ 1` the never-sent quota
/// (membound's adaptive split never gives dirty pages more than `q_d`).
///
/// - Never-sent pages: each is sent exactly once while live (sending it moves it out of the
///   group for good, and the live phase ends when the group is empty): `N` pages. This covers
///   the epoch-0 phase, which sends only never-sent pages.
/// - Resends while live: after the first harvest a cycle sends at most `q_d` dirty pages and,
///   while at least `c − (dirty sent)` never-sent pages are left, at least `q_n` never-sent ones;
///   so resends ≤ `q_d / q_n` × never-sent pages sent, plus the last cycle's fill. The policy
///   does not rely on that sum: it counts resends from `Progress` (`pages_sent − (total_pages −
///   never_sent)`) and never asks for more than the budget `⌈N × q_d / q_n⌉` (`N` with the
///   default 50/50 split), so the live phase sends at most `N + ⌈N q_d / q_n⌉` pages (`2N`).
///   With the timeout and `on_limit = switchover` it only sends fewer.
/// - Stop-and-copy: only pages that were sent can be dirty, each once: at most `N`.
///
/// - Membound's tail (after the never-sent group is empty, when the downtime forecast exceeds
///   `target_downtime`): passes over the dirty set, still counted against the same budget, and
///   at most `MAX_TAIL_PASSES` (3) of them; the budget spent, it switches over.
///
/// Hence at most `2N + ⌈N q_d / q_n⌉` pages (`3N` by default), whatever the dirty rate. The
/// live phase is link-bound (every decision sends a full cycle or ends the phase), so the time
/// is that many pages at `bandwidth`; what is not page transfer (harvests, the digest
/// comparison, state, resume) is the allowance. With `timeout` and `on_limit = abort`, a
/// timeout shorter than the bound may abort it, and the bound is `None`.
///
/// ## Timebound
///
/// The same count with the split of `timebound_dirty_share` (`q_d = 20`, `q_n = 80` by
/// default): the mass transfer sends `N` pages, the dirty sender at most `⌈N/4⌉` while it
/// runs, the stop-and-copy at most `N`: `2.25 N` pages.
///
/// ## Precopy and autoconverge
///
/// With `on_limit = abort`: `None` (it may give up). With `on_limit = switchover`: the first
/// pass sends each page once (`N`); a dirty pass happens after harvest `k` only while `k <
/// max_epochs` and sends at most the `≤ N` pages dirty at that harvest (the policy counts them);
/// then the stop-and-copy sends at most `N`: `(max_epochs + 1) × N` pages (`max_epochs` taken
/// as at least 1). With a `timeout` the live phase also ends at the first decision after
/// `max(timeout, first pass)`, so the bound is the smaller of that and `timeout + (2N + c) ×
/// page time + allowance`.
pub fn bound(
    kind: PolicyKind,
    mem_bytes: u64,
    bandwidth: f64,
    bytes_per_page: f64,
    cfg: &PolicyConfig,
) -> Option<Duration> {
    if !(bandwidth.is_finite() && bandwidth > 0.0) {
        return None;
    }
    let n = mem_bytes.div_ceil(PAGE_SIZE as u64);
    let bpp = if bytes_per_page.is_finite() && bytes_per_page > 0.0 {
        bytes_per_page
    } else {
        WORST_WIRE_BYTES_PER_PAGE as f64
    };
    let slack = if cfg.bound_slack.is_finite() {
        cfg.bound_slack.max(1.0)
    } else {
        1.0
    };
    let transfer = |pages: u64| pages as f64 * bpp / bandwidth * slack;
    let allowance =
        cfg.bound_fixed.as_secs_f64() + cfg.bound_per_gib.as_secs_f64() * mem_bytes as f64 / GIB;
    let mut secs = transfer(bound_pages(kind, n, cfg)?) + allowance;
    if let Some(t) = cfg.timeout {
        let iterative = matches!(kind, PolicyKind::Precopy | PolicyKind::Autoconverge);
        match (iterative, cfg.on_limit) {
            (true, OnLimit::Switchover) => {
                let by_timeout = t.as_secs_f64()
                    + transfer(n.saturating_mul(2).saturating_add(cfg.cycle()))
                    + allowance;
                secs = secs.min(by_timeout);
            }
            (false, OnLimit::Abort) if t.as_secs_f64() < secs => return None,
            _ => {}
        }
    }
    Some(secs_to_duration(secs))
}

/// The most dirty pages a bounded policy resends during the live phase of a migration of
/// `total_pages` pages, given its largest cycle split `(q_d, q_n)`: `⌈N × q_d / q_n⌉` (see
/// [`bound`]).
fn resend_budget(total_pages: u64, (q_dirty, q_never): (u64, u64)) -> u64 {
    let budget = u128::from(total_pages) * u128::from(q_dirty);
    u64::try_from(budget.div_ceil(u128::from(q_never.max(1)))).unwrap_or(u64::MAX)
}

/// Why a memory-bound policy aborts at its timeout (`on_limit = abort`).
/// The timeout of a multiplexing policy (MPLM, TLM, membound), checked unless already in a
/// `hurry`: once it has passed, `limit` is set and, with `on_limit = abort`, the answer is an
/// abort; with `switchover`, the policy hurries from then on (never-sent pages only).
fn multiplex_timeout(
    name: &str,
    p: &Progress,
    cfg: &PolicyConfig,
    hurry: &mut bool,
    limit: &mut bool,
) -> Option<Decision> {
    if *hurry || !cfg.timed_out(p) {
        return None;
    }
    *limit = true;
    match cfg.on_limit {
        OnLimit::Abort => Some(Decision::Abort(format!(
            "{name}: timeout {:?} reached with {} of {} pages never sent",
            cfg.timeout.unwrap_or_default(),
            p.never_sent,
            p.total_pages
        ))),
        OnLimit::Switchover => {
            *hurry = true;
            None
        }
    }
}

/// One live-phase step of a multiplexing policy: a harvest once `epoch` has passed since the
/// last one (never two in a row, so that pages go out between harvests); before the first
/// harvest or in a `hurry`, never-sent pages only; else `None`: the policy's own cycle.
fn multiplex_step(
    p: &Progress,
    cfg: &PolicyConfig,
    epoch: Duration,
    hurry: bool,
    harvested: &mut bool,
) -> Option<Decision> {
    if !hurry && !*harvested && p.since_harvest >= epoch {
        *harvested = true;
        return Some(Decision::Harvest);
    }
    *harvested = false;
    (p.epoch == 0 || hurry).then(|| Decision::Send {
        never_sent: p.never_sent.min(cfg.cycle()),
        dirty: 0,
    })
}

/// A multiplexing cycle of `cycle` pages: up to `q_dirty` of the `dirty_avail` dirty pages,
/// never-sent pages for the rest, and whichever group has pages left fills the cycle when
/// the other runs short.
fn fill_cycle(cycle: u64, q_dirty: u64, dirty_avail: u64, never_sent: u64) -> Decision {
    let dirty = dirty_avail.min(q_dirty);
    let never_sent = never_sent.min(cycle - dirty);
    let fill = (dirty_avail - dirty).min(cycle - dirty - never_sent);
    Decision::Send {
        never_sent,
        dirty: dirty + fill,
    }
}

/// One step of a pass over the dirty group: up to `cycle` of the `pass_left` pages still to
/// ask for, at most `avail` (the dirty pages there, within any budget); a harvest once the
/// pass is done or nothing is left to send.
fn dirty_pass(pass_left: &mut u64, avail: u64, cycle: u64) -> Decision {
    let n = (*pass_left).min(avail).min(cycle);
    if n == 0 {
        *pass_left = 0;
        return Decision::Harvest;
    }
    *pass_left -= n;
    Decision::Send {
        never_sent: 0,
        dirty: n,
    }
}

/// Dirty pages resent so far in the live phase: every send beyond the first of each page.
fn resent(p: &Progress) -> u64 {
    let first_sends = p.total_pages.saturating_sub(p.never_sent);
    p.pages_sent.saturating_sub(first_sends)
}

/// Converts seconds to a [`Duration`], saturating (NaN and negatives become zero).
fn secs_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

/// Seconds to send one page, from the measured rates; `None` while the bandwidth is unknown.
fn page_time(p: &Progress) -> Option<f64> {
    if !(p.bandwidth.is_finite() && p.bandwidth > 0.0) {
        return None;
    }
    let bpp = if p.bytes_per_page.is_finite() && p.bytes_per_page > 0.0 {
        p.bytes_per_page
    } else {
        PAGE_SIZE as f64
    };
    Some(bpp / p.bandwidth)
}

/// Weight of the newest epoch in the smoothed dirty rate. Single epochs are noisy (a sweep that
/// happens to write only never-sent pages during an epoch puts nothing in the dirty group).
const RATE_SMOOTHING: f64 = 0.5;

/// Follows harvests to estimate the dirty rate (pages newly dirtied per second), for forecasts.
#[derive(Debug, Clone, Default)]
struct EpochTracker {
    seen_epoch: u32,
    /// Seconds since the start at which the last harvest happened.
    last_harvest_at: f64,
    /// Smoothed pages put in the dirty group per second; `None` before the first harvest.
    rate: Option<f64>,
    /// In the last epoch, the rate at which a clean (sent, not dirty) page became dirty, per
    /// second: pages newly dirtied ÷ (clean pages × epoch length). Unlike `rate`, it does not
    /// collapse when most pages are dirty already.
    clean_rate: Option<f64>,
    /// The same for cold pages only: pages that became hot in the epoch are not counted.
    cold_clean_rate: Option<f64>,
    /// Hot pages at the last harvest.
    last_hot: u64,
    /// Never-sent pages held back with them, at the last harvest.
    last_held_back: u64,
    /// Never-sent pages at the last harvest (`None` before the first).
    never_sent_at_harvest: Option<u64>,
}

impl EpochTracker {
    /// Updates from the progress of a decision; returns whether a harvest happened since the
    /// previous call.
    fn observe(&mut self, p: &Progress) -> bool {
        if p.epoch == self.seen_epoch {
            return false;
        }
        let at = p.harvested_at();
        let len = at - self.last_harvest_at;
        if len > 0.0 {
            let rate = p.dirtied_last_epoch as f64 / len;
            self.rate = Some(match self.rate {
                Some(old) => old + RATE_SMOOTHING * (rate - old),
                None => rate,
            });
            let sent = p.total_pages.saturating_sub(p.never_sent);
            let already = p.dirty.saturating_sub(p.dirtied_last_epoch);
            let clean = sent.saturating_sub(already).max(1) as f64;
            self.clean_rate = Some(p.dirtied_last_epoch as f64 / (clean * len));
            // Pages held back before their first send join the hot ones too, but were not
            // sent: they are no clean page turning dirty.
            let held = p.held_back.saturating_sub(self.last_held_back);
            let new_hot = p.hot.saturating_sub(self.last_hot).saturating_sub(held);
            let new_cold = p.dirtied_last_epoch.saturating_sub(new_hot);
            self.cold_clean_rate = Some(new_cold as f64 / (clean * len));
        }
        self.last_hot = p.hot;
        self.last_held_back = p.held_back;
        self.never_sent_at_harvest = Some(p.never_sent);
        self.last_harvest_at = at;
        self.seen_epoch = p.epoch;
        true
    }

    /// Pages newly dirtied per second (0 before the first harvest).
    fn dirty_rate(&self) -> f64 {
        self.rate.unwrap_or(0.0)
    }

    /// Per second, the chance that a clean page becomes dirty, as of the last epoch.
    fn clean_rate(&self) -> f64 {
        self.clean_rate.unwrap_or(0.0)
    }

    /// The same, counting only pages that became cold dirty (not hot).
    fn cold_clean_rate(&self) -> f64 {
        self.cold_clean_rate.unwrap_or(0.0)
    }
}

/// Pages the guest is expected to dirty (write after they were sent) from the last harvest, or
/// from now if not `from_harvest`, until `ahead` seconds from now, under `throttle`; the
/// never-sent pages go out at an even pace over the next `sending` seconds (a share of them
/// within the window if that is longer), and so does the share `resent` of the working set
/// (see [`WriteModel::dirtied`]). Uses the
/// executor's write model ([`WriteModel::dirtied`]) when there is one, else the dirty rate of
/// the last epochs.
fn expected_writes(
    p: &Progress,
    track: &EpochTracker,
    ahead: f64,
    sending: f64,
    from_harvest: bool,
    throttle: f64,
    resent: f64,
) -> Writes {
    let g = (1.0 - throttle).max(0.0);
    let ahead = ahead.max(0.0);
    let since = if from_harvest {
        p.since_harvest.as_secs_f64()
    } else {
        0.0
    };
    let Some(m) = &p.writes else {
        // The last epochs' dirty rate: pages a harvest found dirty, rewritten as a working
        // set would be.
        return Writes {
            working_set: track.dirty_rate() * g * (since + ahead),
            ..Writes::default()
        };
    };
    let total = p.total_pages.max(1) as f64;
    let ns_now = p.never_sent as f64;
    let ns_then = if from_harvest {
        track.never_sent_at_harvest.unwrap_or(p.total_pages) as f64
    } else {
        ns_now
    };
    // Of the never-sent pages, the share that goes out within the window.
    let within = if sending > ahead {
        ahead / sending
    } else {
        1.0
    };
    let shares = [
        // Sent before the window: written to for all of it.
        (1.0 - ns_then / total, since + ahead),
        // Sent since the window began, evenly: on average for half of that.
        ((ns_then - ns_now).max(0.0) / total, since / 2.0 + ahead),
        // Still to send: those sent within the window, on average `sending / 2` after it
        // began (all of them if they go out within it).
        (
            ns_now / total * within,
            ahead - sending.clamp(0.0, ahead) / 2.0,
        ),
    ]
    .map(|(share, t)| (share, t * g));
    m.dirtied((since + ahead) * g, ahead * g, &shares, resent)
}

/// The live phase of a multiplexing policy (MPLM, TLM, membound), forecast. Every never-sent
/// page goes once; from the first harvest on (every `epoch`), each brings `ratio` resends
/// along, while there are dirty pages to resend: the `resendable` ones now and those dirty at
/// the last harvest before the end beyond the dirty ones now, at most `budget`. Pages written
/// after the last harvest before the end cannot be resent. What is dirty now counts what the
/// log has shown written since the last harvest, when the executor reads it
/// ([`Progress::unharvested`]); writes to come fall, the working set's on dirty pages, the
/// drift's on any ([`Writes::over`]). With no harvest before the end, the pages dirty at the
/// end are what is dirty then less the resends, and at least what is written since the last
/// harvest. With one, they are what the resends leave of the pages dirty at that harvest
/// together with what is written after it ([`Writes::with_seen`]: a working set rewrites the
/// pages that were resent).
///
/// The live phase lasts as long as its sends take. With the mean model, every share of
/// resends is taken filled: a guest writing at an even rate keeps dirty pages to resend. A
/// sweep's writes fall where it stands against the sends, and it may leave none: the live
/// phase is taken first as long as the never-sent pages take (the shortest it can be), then
/// as long as the sends that forecast found, over [`LIVE_ROUNDS`] rounds at most. Taken with
/// every share filled, on the simulator, an MPLM migration whose sends never caught up with a
/// slow sweep had a harvest fall before that end and resends forecast that never came: the
/// time left 25% too long on average, up to 60%.
///
/// With `holds` (membound's [`Controls::defer_hot`]), a never-sent page the guest writes
/// before its send is held back: dirty at the end and not sent live, where it would otherwise
/// count in both when written again after its send.
///
/// Returns the pages sent live and the pages dirty at the end of the live phase.
fn multiplexed_forecast(p: &Progress, args: Multiplex) -> (f64, f64) {
    if sweep(p).is_none() {
        return multiplexed_over(p, args, None);
    }
    let t = page_time(p).unwrap_or(0.0);
    let mut live = p.never_sent as f64 * t;
    let mut out = multiplexed_over(p, args, Some(live));
    for _ in 0..LIVE_ROUNDS {
        let next = out.0 * t;
        if (next - live).abs() <= 1e-3 * live {
            break;
        }
        live = next;
        out = multiplexed_over(p, args, Some(live));
    }
    out
}

/// Rounds [`multiplexed_forecast`] takes at most to settle how long the live phase lasts.
const LIVE_ROUNDS: usize = 4;

/// How a multiplexing policy runs its live phase, for [`multiplexed_forecast`].
#[derive(Debug, Clone, Copy)]
struct Multiplex<'a> {
    track: &'a EpochTracker,
    /// Resends each never-sent page brings along, from the first harvest on.
    ratio: f64,
    /// Between harvests.
    epoch: Duration,
    /// Dirty pages that can be resent now, and the most resends left.
    resendable: f64,
    budget: f64,
    /// Whether a never-sent page written before its send is held back (membound).
    holds: bool,
}

/// [`multiplexed_forecast`] over a live phase of `live` seconds, or as long as every share of
/// resends filled takes if `None`.
fn multiplexed_over(p: &Progress, args: Multiplex, live: Option<f64>) -> (f64, f64) {
    let Multiplex {
        track,
        ratio,
        epoch,
        resendable,
        budget,
        holds,
    } = args;
    let ns = p.never_sent as f64;
    let t = page_time(p).unwrap_or(0.0);
    let e = epoch.as_secs_f64();
    let since = p.since_harvest.as_secs_f64();
    // Before the first harvest, never-sent pages only.
    let plain = if p.epoch > 0 {
        0.0
    } else if t > 0.0 {
        ((e - since).max(0.0) / t).min(ns)
    } else {
        ns
    };
    let capacity = (ns - plain) * ratio.max(0.0);
    let live = live.unwrap_or((ns + capacity) * t);
    let window = since + live;
    let after_last = if e > 0.0 { window % e } else { window };
    let total = p.total_pages as f64;
    // What a harvest now would put in the dirty groups, as far as the log has shown it; the
    // model forecasts only the writes to come.
    let seen = p.unharvested.map(|n| n as f64);
    let from_harvest = seen.is_none();
    let known = (p.dirty as f64 + seen.unwrap_or(0.0)).min(total);
    if let Some((lw, shapes)) = sweep(p) {
        let at = SweepEnd {
            known,
            seen: seen.unwrap_or(0.0),
            capacity: capacity.min(budget.max(0.0)),
            resendable,
            harvest_ahead: after_last < window,
            next_harvest: if e > 0.0 { (e - since).max(0.0) } else { 0.0 },
            epoch: e,
            holds,
        };
        return at.forecast(p, lw, &shapes, live, after_last);
    }
    let written = expected_writes(p, track, live, live, from_harvest, 0.0, 0.0);
    let ws = p.working_set();
    let ns = ns
        - if holds {
            held_later(p, known, live)
        } else {
            0.0
        };
    let since_harvest = match seen {
        Some(seen) => written.with_seen(seen, ws, total),
        None => written.total(),
    };
    if after_last >= window {
        // No harvest before the end: what is dirty then, less the resends of what is dirty now,
        // and at least what was written since the last harvest.
        let resends = capacity.min(budget.max(0.0)).min(resendable);
        let dirty_then = written.over(known, total);
        let at_end = (dirty_then - resends).max(since_harvest).clamp(0.0, total);
        return (ns + resends, at_end);
    }
    // From the last harvest before the end: the never-sent pages left then go out evenly over
    // the rest of the live phase.
    let at_last = Progress {
        never_sent: (ns * after_last / live.max(f64::MIN_POSITIVE)).min(ns) as u64,
        ..p.clone()
    };
    let sending = after_last.min(live);
    let unsendable = expected_writes(&at_last, track, after_last, sending, false, 0.0, 0.0);
    // Until then: the harvests find what is dirty at the last one, beyond what is now.
    let until = (live - after_last).max(0.0);
    let dirty_at_last =
        expected_writes(p, track, until, live, from_harvest, 0.0, 0.0).over(known, total);
    // At least the pages written before it and not after (more when the touched pages cap
    // both counts: a sweep writes the same pages before and after).
    let before = since_harvest - unsendable.total();
    let found = before.max(dirty_at_last - p.dirty as f64).max(0.0);
    let resends = capacity.min(budget.max(0.0)).min(resendable + found);
    // Dirty at the end: what the resends leave of the pages dirty at the last harvest, and
    // what is written after it, on those or on others (a working set rewrites what was resent).
    let left = (dirty_at_last - resends).max(0.0);
    let at_end = unsendable.with_seen(left, ws, total).clamp(0.0, total);
    (ns + resends, at_end)
}

/// Of the never-sent pages, those the working set's writes reach before their send, going out
/// evenly over the next `live` seconds: the working set's pages not known dirty, as many
/// never-sent among them as among all the pages not dirty, each written at the model's rate
/// per page, `μ`, so before its send with the chance `φ(μL) = 1 − (1 − e^{−μL}) / μL`.
fn held_later(p: &Progress, known: f64, live: f64) -> f64 {
    let Some(m) = p.writes.filter(|m| m.rate > 0.0 && m.wss > 0.0) else {
        return 0.0;
    };
    let total = p.total_pages as f64;
    let not_dirty = (total - known).max(1.0);
    let unwritten = (m.working_set() - known).max(0.0);
    let never_sent = unwritten * (p.never_sent as f64 / not_dirty).min(1.0);
    never_sent * phi(m.rate / m.wss * live)
}

/// Of pages each written at random at a rate that makes `x` writes a page over a window,
/// and each sent at an even time within it, the share written between the send and the
/// window's end (or, the same, between its start and the send): `φ(x) = 1 − (1 − e^{−x}) / x`.
fn phi(x: f64) -> f64 {
    if x <= 1e-12 {
        0.0
    } else {
        1.0 + (-x).exp_m1() / x
    }
}

/// A sweep's period shorter than this is not followed page by page: the log is read every
/// [`FORECAST_EVERY`], and every page it covers is dirty again within a few reads anyway.
const SWEEP_MIN_PERIOD: f64 = 0.75;

/// The sweep has covered its pages once when the touched pages grow slower than this share of
/// its rate.
const SWEEP_COVERED: f64 = 0.1;

/// The sweep's speed as the log showed it, in pages per second, is taken when within this
/// factor of the write model's drift either way; else the model's.
const SWEEP_SPEED_TRUSTED: f64 = 4.0;

/// Where the pages stand in the sweep, its period in seconds and the pages it covers, when the
/// guest sweeps memory: a write model with a drift and no working set, a period of at least
/// [`SWEEP_MIN_PERIOD`], and a clock that saw writes.
///
/// In the first lap, the speed is the one the log showed over the last half second, when it
/// did. The write model's drift is the probe's, scaled by the vCPUs' CPU time since: on the
/// testbed, a `dirty-all` guest wrote 1.4–2.3 times as many pages per CPU-second after the
/// first half second of an MPLM migration as in the probe, and the stop-and-copy forecast at
/// 50% was half the actual one (388 against 728 ms); that guest was ending its first pass
/// over memory since boot, at half the later passes' speed on this PVM host
/// (`engine/examples/write_rate.rs`). After the first lap the log shows only the writes to
/// pages sent since the last, and the runs found jump: on `seq` 128M, read there, the speed
/// came out 2–2.5 times the model's, then half of it, and the time left at 25% 22–42% long
/// in three timebound runs; the model's speed is kept there.
///
/// When the clock follows a sweep a share of memory ([`SweepOrder::parts`]), each gets its
/// own `(period, pages)`: over its share of memory, or the pages it has seen once covered,
/// at its share of the drift by the speeds the log shows (by the pages seen until those are
/// measured).
fn sweep(p: &Progress) -> Option<(&SweepOrder, Vec<(f64, f64)>)> {
    let m = p.writes.as_ref()?;
    let lw = p.sweep_order.as_deref()?;
    let touched = m.touched?;
    // Until the sweep has covered its pages once, the touched pages understate them: it is
    // taken over all of memory (or its share), as the probe's model has it, at the speed the
    // log shows; over what it covers once it has gone back to its start.
    let covered = touched.rate < SWEEP_COVERED * m.drift;
    // Per sweep: the pages it covers, its speed as the log shows it, its share of the drift.
    let sweeps: Vec<(f64, f64, f64)> = if lw.parts.is_empty() {
        vec![if covered {
            (m.drift / m.drift_page_rate(), 0.0, 1.0)
        } else {
            let set = lw.whole.extent.map_or(m.memory, |e| e as f64 * lw.stride);
            (set, lw.whole.speed * lw.stride, 1.0)
        }]
    } else {
        // One sweep a share of memory: each writes its share of the drift, as fast as the log
        // shows it move against the others (as many pages as it has seen, until measured).
        let speeds: f64 = lw.parts.iter().map(|q| q.speed).sum();
        let measured = lw.parts.iter().all(|q| q.speed > 0.0);
        let seen = lw.parts.iter().map(|q| q.seen as f64).sum::<f64>().max(1.0);
        lw.parts
            .iter()
            .map(|q| {
                let share = if measured {
                    q.speed / speeds
                } else {
                    q.seen as f64 / seen
                };
                if covered {
                    (q.seen as f64 * lw.stride, 0.0, share)
                } else {
                    let set = q.extent.unwrap_or(q.samples) as f64 * lw.stride;
                    (set, q.speed * lw.stride, share)
                }
            })
            .collect()
    };
    let shapes: Vec<(f64, f64)> = sweeps
        .into_iter()
        .map(|(set, shown, share)| {
            let model = m.drift * share;
            let trusted =
                (1.0 / SWEEP_SPEED_TRUSTED..=SWEEP_SPEED_TRUSTED).contains(&(shown / model));
            (set / if trusted { shown } else { model }, set)
        })
        .collect();
    let periodic = shapes
        .iter()
        .all(|&(period, _)| period.is_finite() && period >= SWEEP_MIN_PERIOD);
    (m.working_set() < 1.0 && periodic && lw.whole.seen > 0 && !lw.scattered)
        .then_some((lw, shapes))
}

/// The end of a multiplexing policy's live phase over a sweeping guest, page by page
/// ([`sweep`]): which pages the sweep writes after their send, before and after the last
/// harvest.
struct SweepEnd {
    /// Pages dirty now, and of them those the log showed since the last harvest.
    known: f64,
    seen: f64,
    /// Resends the live phase has room for.
    capacity: f64,
    /// Dirty pages that can be resent now.
    resendable: f64,
    /// Whether a harvest falls before the end; seconds to the next one, and between them.
    harvest_ahead: bool,
    next_harvest: f64,
    epoch: f64,
    /// Whether a never-sent page written before its send is held back (see
    /// [`multiplexed_forecast`]).
    holds: bool,
}

impl SweepEnd {
    /// The pages sent live and those dirty at the end of a live phase of `live` seconds, the
    /// last harvest `after_last` seconds before its end (see [`multiplexed_forecast`]), over
    /// sweeps of `(period, pages)` ([`SweepOrder::pages`]).
    fn forecast(
        &self,
        p: &Progress,
        lw: &SweepOrder,
        shapes: &[(f64, f64)],
        live: f64,
        after_last: f64,
    ) -> (f64, f64) {
        let ns = p.never_sent as f64;
        let total = p.total_pages as f64;
        let until = if self.harvest_ahead {
            (live - after_last).max(0.0)
        } else {
            live
        };
        // Pages not dirty now that the sweep dirties by the last harvest and by the end;
        // pages it writes after the last harvest, and of those the ones dirty at it.
        let (mut new_then, mut new_end, mut after, mut after_dirty) = (0.0, 0.0, 0.0, 0.0);
        let mut held = 0.0;
        for pg in lw.pages(shapes, p.elapsed, p.never_sent, live) {
            if self.holds && pg.sent_in > 0.0 && pg.written_in(0.0, pg.sent_in) {
                // Written before its send: held back, dirty from that write to the end.
                held += 1.0;
                new_then += f64::from(u8::from(pg.written_in(0.0, until)));
                new_end += 1.0;
                continue;
            }
            let by_then = pg.dirtied_by(until);
            if !pg.dirty {
                new_then += f64::from(u8::from(by_then));
                new_end += f64::from(u8::from(pg.dirtied_by(live)));
            }
            if pg.sent_in < live && pg.written_in(pg.sent_in.max(until), live) {
                after += 1.0;
                if pg.dirty || by_then {
                    after_dirty += 1.0;
                }
            }
        }
        let [new_then, new_end, after, after_dirty, held] =
            [new_then, new_end, after, after_dirty, held].map(|n| n * lw.stride);
        let ns = (ns - held).max(0.0);
        if !self.harvest_ahead {
            // What is dirty now stays so unless resent; the sweep adds what it writes.
            let resends = self.capacity.min(self.resendable);
            let at_end = (self.known + new_end - resends).max(self.seen + new_end);
            return (ns + resends, at_end.clamp(0.0, total));
        }
        let dirty_then = (self.known + new_then).min(total);
        let found = (dirty_then - p.dirty as f64).max(0.0);
        let resends = self.capacity.min(self.resendable + found);
        if !self.holds {
            return (
                ns + resends,
                self.resent_in_turn(p, lw, shapes, live).min(total),
            );
        }
        // What the resends leave of the pages dirty at the last harvest, and what the sweep
        // writes after it; the pages in both, as many as the resends left of those dirty then.
        let left = (dirty_then - resends).max(0.0);
        let kept = if dirty_then > 0.0 {
            left / dirty_then
        } else {
            0.0
        };
        let at_end = left + after - after_dirty * kept;
        (ns + resends, at_end.clamp(0.0, total))
    }

    /// The pages dirty at the end of a live phase of `live` seconds with harvests ahead, the
    /// resends followed in turn (timebound, MPLM): each goes to the dirty page written the
    /// longest ago that a harvest has found, at an even `capacity / live` a second from the
    /// first harvest on, and leaves it clean until the sweep writes it again. A sweep comes
    /// back first to the pages it wrote the longest ago: with a period longer than the epoch,
    /// it writes most of what the last harvest but one found again before the last, resent or
    /// not. Counting each resend off the pages dirty at the last harvest instead, timebound's
    /// stop-and-copy over two sweeps (the testbed's `seq` 128M) came out short from every
    /// start in the simulator, by 11% on average, and its ETA at 25% 10–18% short on the
    /// testbed. The executor resends in address order from a cursor, cold pages before hot
    /// ones; for a sweep that is its write order up to where it wraps.
    ///
    /// Over at most [`IN_TURN_PAGES`] of the sampled pages, evenly spread.
    fn resent_in_turn(
        &self,
        p: &Progress,
        lw: &SweepOrder,
        shapes: &[(f64, f64)],
        live: f64,
    ) -> f64 {
        let all = lw.never_sent.len() + lw.clean.len() + lw.dirty.len();
        let step = all.div_ceil(IN_TURN_PAGES).max(1);
        let pages: Vec<SweptPage> = lw
            .pages(shapes, p.elapsed, p.never_sent, live)
            .step_by(step)
            .collect();
        let stride = lw.stride * step as f64;
        let start = if p.epoch == 0 {
            self.next_harvest.min(live)
        } else {
            0.0
        };
        let rate = self.capacity / stride / (live - start).max(f64::MIN_POSITIVE);
        let gap = if rate > 0.0 {
            1.0 / rate
        } else {
            f64::INFINITY
        };
        let (writes, last) = self.writes_to_resend(&pages, stride, live);
        let mut resent = vec![f64::NEG_INFINITY; pages.len()];
        let mut t = start;
        for (w, found, i) in writes {
            if resent[i] >= w {
                // Resent since this write.
                continue;
            }
            let at = t.max(found);
            if at > live {
                break;
            }
            resent[i] = at;
            t = at + gap;
        }
        let dirty = (last.iter().zip(&resent))
            .filter(|(&w, &r)| w.is_finite() && w > r)
            .count();
        dirty as f64 * stride
    }

    /// For [`Self::resent_in_turn`], the writes that make `pages` dirty by `live`, in the
    /// order they come: when, when a harvest finds them, and the page (its index). The pages
    /// dirty now come first, oldest first: those in the dirty groups can go at once, the rest
    /// once the next harvest finds them; then every write after a page's send. With them,
    /// each page's last write (`-∞` if none).
    fn writes_to_resend(
        &self,
        pages: &[SweptPage],
        stride: f64,
        live: f64,
    ) -> (Vec<(f64, f64, usize)>, Vec<f64>) {
        let (h1, e) = (self.next_harvest, self.epoch);
        let found_at = |w: f64| {
            if w <= h1 {
                h1
            } else if e > 0.0 {
                h1 + ((w - h1) / e).ceil() * e
            } else {
                w
            }
        };
        let mut now: Vec<(f64, usize)> = (pages.iter().enumerate())
            .filter(|(_, pg)| pg.dirty)
            .map(|(i, pg)| (pg.written_last(), i))
            .collect();
        now.sort_by(|a, b| a.0.total_cmp(&b.0));
        let grouped = ((self.resendable / stride).round() as usize).min(now.len());
        let mut writes: Vec<(f64, f64, usize)> = (now.iter().enumerate())
            .map(|(k, &(w, i))| (w, if k < grouped { 0.0 } else { h1 }, i))
            .collect();
        let mut last = vec![f64::NEG_INFINITY; pages.len()];
        for &(w, i) in &now {
            last[i] = w;
        }
        for (i, pg) in pages.iter().enumerate() {
            let mut w = pg.write_after(pg.sent_in.max(0.0));
            for _ in 0..IN_TURN_WRITES {
                if w > live {
                    break;
                }
                writes.push((w, found_at(w), i));
                last[i] = w;
                w = pg.write_after(w);
            }
            // A long live phase: the page's last write stands for the rest.
            let after_send = |w: f64| w > last[i] && w > pg.sent_in;
            if let Some(w) = pg.last_write_by(live).filter(|&w| after_send(w)) {
                writes.push((w, found_at(w), i));
                last[i] = w;
            }
        }
        writes.sort_by(|a, b| a.0.total_cmp(&b.0));
        (writes, last)
    }
}

/// At most this many of the sampled pages, and of each page's writes, are followed through
/// the resends in turn ([`SweepEnd::resent_in_turn`]): 8192 pages keep a forecast's cost where
/// it was (2.1 ms for timebound halfway through a 512 MiB guest), and a sweep's period is at
/// least [`SWEEP_MIN_PERIOD`].
const IN_TURN_PAGES: usize = 8192;
const IN_TURN_WRITES: usize = 16;

/// Seconds to send one page in the stop-and-copy, from `t` live: at the paused rate, if the
/// probe measured one and it is faster than the live rate.
fn paused_page_time(p: &Progress, t: f64) -> f64 {
    if p.paused_bandwidth.is_finite() && p.paused_bandwidth > 0.0 {
        t.min(t * p.bandwidth / p.paused_bandwidth)
    } else {
        t
    }
}

/// Seconds to send one page live with the vCPUs throttled by `throttle`, from `t` unthrottled:
/// the workers get back the share of the cores the vCPUs give up, towards the paused rate.
fn throttled_page_time(p: &Progress, t: f64, throttle: f64) -> f64 {
    rethrottled_page_time(p, t, 0.0, throttle)
}

/// [`throttled_page_time`] from `t` measured under the throttle `now`.
fn rethrottled_page_time(p: &Progress, t: f64, now: f64, throttle: f64) -> f64 {
    let paused = paused_page_time(p, t);
    let now = now.clamp(0.0, crate::vm::MAX_THROTTLE);
    let free = t + (t - paused) * now / (1.0 - now);
    free + throttle.clamp(0.0, 1.0) * (paused - free)
}

/// [`forecast_from`], with a `pass` of pages sent live at `pass_time` seconds a page (a pass
/// under a throttle) on top of the `live_pages`.
fn forecast_with_pass(
    p: &Progress,
    live_pages: f64,
    (pass, pass_time): (f64, f64),
    final_pages: f64,
) -> Forecast {
    let mut f = forecast_from(p, live_pages + pass, final_pages);
    if let Some(t) = page_time(p) {
        let saved = pass.max(0.0) * (t - pass_time).max(0.0);
        f.remaining = f.remaining.saturating_sub(secs_to_duration(saved));
    }
    f
}

/// Builds a [`Forecast`] from pages left to send live and in the stop-and-copy (at the paused
/// rate, after its first batch is encoded).
fn forecast_from(p: &Progress, live_pages: f64, final_pages: f64) -> Forecast {
    let queued = p.queued.min(p.pages_sent) as f64;
    let left = queued + live_pages.max(0.0) + final_pages.max(0.0);
    let done = p.pages_sent as f64 - queued;
    let fraction_done = if done + left > 0.0 {
        (done / (done + left)).clamp(0.0, 1.0)
    } else {
        1.0
    };
    match page_time(p) {
        Some(t) => {
            let final_pages = final_pages.max(0.0);
            let downtime = final_pages * paused_page_time(p, t) + p.stop_batches.fill(final_pages);
            Forecast {
                remaining: secs_to_duration((queued + live_pages.max(0.0)) * t + downtime),
                downtime: secs_to_duration(downtime),
                fraction_done,
            }
        }
        None => Forecast {
            remaining: Duration::MAX,
            downtime: Duration::MAX,
            fraction_done,
        },
    }
}

#[cfg(test)]
mod tests;
