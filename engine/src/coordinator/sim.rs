//! A deterministic migration simulator, for tests and benches.
//!
//! A simulated VM of `pages` pages is written by a dirty model (uniform, sequential sweep or
//! hot/cold over a working set, from a seeded RNG); a simulated link carries `bandwidth` wire
//! bytes/s at `bytes_per_page` wire bytes per page; a virtual clock advances by one page time per
//! page sent. The simulator plays the executor: it asks a [`Policy`] for decisions and carries
//! them out with the same semantics as the real one (dirty log cleared by each harvest, pages
//! read when sent, hot pages classified and deferred, a final harvest and pass after the
//! pause), applies the policy's [`Controls`] (a throttle of `θ` scales the dirty rate by `1 −
//! θ`; packing `vcpus` vCPUs onto `c` cores scales it by `c / vcpus`), and checks at the end
//! that every page on the destination has its last version.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::{
    cores_share, secs_to_duration, Controls, Decision, Forecast, Overcommit, Packed, PageState,
    Policy, Progress, StopBatches, SweepOrder, TouchedGrowth, WriteClock, WriteModel,
};

/// How the simulated guest writes its memory. Rates are page writes per second.
#[derive(Debug, Clone, PartialEq)]
pub enum DirtyModel {
    /// Writes nothing.
    Idle,
    /// Each write hits a uniformly random page among the first `working_set` pages.
    Uniform { rate: f64, working_set: u64 },
    /// Writes sweep the first `working_set` pages in order, over and over (the MG-like sweep;
    /// with the whole memory as working set, the case pre-copy never converges on).
    Sequential { rate: f64, working_set: u64 },
    /// Each of the [`SimConfig::vcpus`] sweeps the first `working_set` pages of its share of
    /// memory (`pages ÷ vcpus` from the share's start) in order, over and over, the vCPUs
    /// taking turns: the executor's `seq` workload. `rate` is all the vCPUs' writes together;
    /// the last vCPU writes `last_faster` times as fast as each of the others (1: alike).
    SequentialEach {
        rate: f64,
        working_set: u64,
        last_faster: f64,
    },
    /// A share `hot_share` of the writes hits the first `hot_pages` pages, the rest the other
    /// pages of the working set, uniformly within each part.
    HotCold {
        rate: f64,
        working_set: u64,
        hot_pages: u64,
        hot_share: f64,
    },
}

impl DirtyModel {
    fn rate(&self) -> f64 {
        match *self {
            DirtyModel::Idle => 0.0,
            DirtyModel::Uniform { rate, .. }
            | DirtyModel::Sequential { rate, .. }
            | DirtyModel::SequentialEach { rate, .. }
            | DirtyModel::HotCold { rate, .. } => rate.max(0.0),
        }
    }
}

/// The simulated VM and link.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Guest pages.
    pub pages: u64,
    /// Link rate in wire bytes per second.
    pub bandwidth: f64,
    /// Wire bytes per page sent.
    pub bytes_per_page: f64,
    /// How the guest writes.
    pub dirty: DirtyModel,
    /// vCPUs writing (each at `rate / vcpus`), for over-commit. Default 1.
    pub vcpus: u32,
    /// Seed of the dirty model's RNG.
    pub seed: u64,
    /// Time a live harvest takes (the guest keeps running). Default 1 ms.
    pub harvest_cost: Duration,
    /// Time the switchover adds to the downtime besides sending pages (digests, state,
    /// resume). Default 0.
    pub switchover_cost: Duration,
    /// The write model the executor's probe would have measured (`Progress::writes`), if any.
    /// Default none.
    pub writes: Option<WriteModel>,
    /// Whether the executor reads the dirty log every [`LOG_READ`] between harvests and passes
    /// the pages touched so far with `writes` ([`WriteModel::touched`]), the pages the next
    /// harvest will find ([`Progress::unharvested`]) and where the pages stand in a sweep's
    /// order ([`Progress::sweep_order`]). Default false.
    pub read_log: bool,
    /// How the guest's speed follows the throttle: `(1 − throttle)^throttle_response`. Default
    /// 1; 0 for a guest the throttle does not slow (one starved of CPU by other threads).
    pub throttle_response: f64,
    /// The page a sequential sweep starts from (for [`DirtyModel::SequentialEach`], the
    /// writes already made: each vCPU starts `sweep_start ÷ vcpus` pages in). Default 0.
    pub sweep_start: u64,
    /// How long the guest runs before the migration starts, the log read as it goes (the
    /// executor's probe): the touched pages and the sweep's order are known from the start.
    /// Default 0.
    pub warmup: Duration,
    /// How many times faster than its rate the guest writes during the warmup (the executor's
    /// probe runs before the migration takes cores from it). Default 1.
    pub warmup_speed: f64,
    /// The over-commit the policy is configured with, if any: while it is not in force, the
    /// executor passes what it will change ([`Progress::overcommit_ahead`]: here, the guest
    /// at its share of the cores, and the same link). Default none.
    pub overcommit: Option<Overcommit>,
    /// Give up (stalled) after this many decisions. Default 10 million.
    pub max_decisions: u64,
    /// Give up (stalled) after this much virtual time. Default 1 hour.
    pub max_time: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            pages: 4096,
            bandwidth: 4096.0 * 4096.0,
            bytes_per_page: 4096.0,
            dirty: DirtyModel::Idle,
            vcpus: 1,
            seed: 1,
            harvest_cost: Duration::from_millis(1),
            switchover_cost: Duration::ZERO,
            writes: None,
            read_log: false,
            throttle_response: 1.0,
            sweep_start: 0,
            warmup: Duration::ZERO,
            warmup_speed: 1.0,
            overcommit: None,
            max_decisions: 10_000_000,
            max_time: Duration::from_secs(3600),
        }
    }
}

/// How often the simulated executor reads the dirty log for the touched pages, as the real one
/// does at each forecast.
pub const LOG_READ: Duration = super::FORECAST_EVERY;

/// How a simulated migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEnd {
    /// The VM runs on the destination.
    Completed,
    /// The policy aborted, with its reason.
    Aborted(String),
    /// The simulator gave up (decision or time cap): the policy did not make progress.
    Stalled,
}

/// What a simulated migration did, in the words of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOutcome {
    pub end: SimEnd,
    /// Total migration time (virtual).
    pub total: Duration,
    /// Live time: until the pause.
    pub live: Duration,
    /// Downtime: from the pause to the end (zero unless completed).
    pub downtime: Duration,
    /// Pages sent in all (first sends and resends, live and stop-and-copy).
    pub pages_sent: u64,
    /// Pages sent while the VM ran.
    pub live_pages: u64,
    /// Pages sent in the stop-and-copy.
    pub final_pages: u64,
    /// Never-sent pages held back with the hot ones, written before their first send.
    pub deferred: u64,
    /// Dirty-log harvests during the live phase.
    pub epochs: u32,
    /// Completed without a limit forcing the policy's hand.
    pub converged: bool,
    /// Decisions asked for.
    pub decisions: u64,
    /// `Send` decisions that sent nothing.
    pub empty_sends: u64,
    /// Every page on the destination holds its last version (checked when completed).
    pub consistent: bool,
    /// The highest throttle the policy asked for.
    pub max_throttle: f64,
    /// The fewest cores the policy packed the vCPUs onto, if it did.
    pub min_cores: Option<usize>,
    /// The policy's controls after its last decision (what the executor would undo).
    pub end_controls: Controls,
}

/// SplitMix64: small, fast and the same on every platform and crate version.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The simulated VM, link and clock, playing the executor.
#[derive(Debug, Clone)]
pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    /// Virtual time in seconds.
    now: f64,
    last_harvest: f64,
    page_secs: f64,
    /// Fractional writes carried to the next time step.
    write_carry: f64,
    sweep_cursor: u64,
    /// Writes each vCPU made, for [`DirtyModel::SequentialEach`].
    sweep_writes: Vec<u64>,
    paused: bool,

    version: Vec<u32>,
    sent_version: Vec<u32>,
    sent: Vec<bool>,
    /// Written since the last harvest (the KVM dirty log), with the list of such pages.
    logged: Vec<bool>,
    log: Vec<u32>,
    in_dirty: Vec<bool>,
    dirty: VecDeque<u32>,
    /// Hot pages: resent and written again within the epoch.
    in_hot: Vec<bool>,
    hot: VecDeque<u32>,
    /// Resent since the last harvest.
    resent: Vec<bool>,
    resent_list: Vec<u32>,
    /// Written at least once, how many, and their growth at each read of the log.
    touched: Vec<bool>,
    touched_pages: u64,
    growth: TouchedGrowth,
    last_read: f64,
    clock: WriteClock,
    sweep_order: Option<Arc<SweepOrder>>,
    controls: Controls,
    never_cursor: u64,
    never_sent: u64,

    epoch: u32,
    dirtied_last_epoch: u64,
    pages_sent: u64,
    /// Never-sent pages moved to the hot group, written before their first send.
    deferred: u64,
}

impl Sim {
    /// A VM whose pages are all never-sent, at time zero.
    ///
    /// # Panics
    /// If `pages` does not fit in `u32`, or the bandwidth or bytes per page are not positive.
    pub fn new(cfg: SimConfig) -> Self {
        let n = usize::try_from(cfg.pages).expect("page count fits in memory");
        assert!(
            u32::try_from(cfg.pages).is_ok(),
            "at most 2^32 simulated pages"
        );
        assert!(
            cfg.bandwidth > 0.0 && cfg.bytes_per_page > 0.0,
            "positive link rates"
        );
        Self {
            rng: Rng(cfg.seed),
            now: -cfg.warmup.as_secs_f64(),
            last_harvest: 0.0,
            page_secs: cfg.bytes_per_page / cfg.bandwidth,
            write_carry: 0.0,
            sweep_cursor: cfg.sweep_start,
            sweep_writes: vec![
                cfg.sweep_start / u64::from(cfg.vcpus.max(1));
                cfg.vcpus.max(1) as usize
            ],
            paused: false,
            version: vec![0; n],
            sent_version: vec![0; n],
            sent: vec![false; n],
            logged: vec![false; n],
            log: Vec::new(),
            in_dirty: vec![false; n],
            dirty: VecDeque::new(),
            in_hot: vec![false; n],
            hot: VecDeque::new(),
            resent: vec![false; n],
            resent_list: Vec::new(),
            touched: vec![false; n],
            touched_pages: 0,
            growth: TouchedGrowth::default(),
            last_read: -cfg.warmup.as_secs_f64(),
            clock: WriteClock::with_shares(cfg.pages, cfg.vcpus as usize),
            sweep_order: None,
            controls: Controls::default(),
            never_cursor: 0,
            never_sent: cfg.pages,
            epoch: 0,
            dirtied_last_epoch: 0,
            pages_sent: 0,
            deferred: 0,
            cfg,
        }
    }

    /// Seconds one page takes on the link.
    pub fn page_secs(&self) -> f64 {
        self.page_secs
    }

    /// What the executor would measure now.
    pub fn progress(&self) -> Progress {
        let known = self.pages_sent > 0;
        Progress {
            elapsed: secs_to_duration(self.now),
            since_harvest: secs_to_duration(self.now - self.last_harvest),
            epoch: self.epoch,
            total_pages: self.cfg.pages,
            never_sent: self.never_sent,
            dirty: (self.dirty.len() + self.hot.len()) as u64,
            hot: self.hot.len() as u64,
            pages_sent: self.pages_sent,
            queued: 0,
            bytes_sent: (self.pages_sent as f64 * self.cfg.bytes_per_page) as u64,
            bandwidth: if known { self.cfg.bandwidth } else { 0.0 },
            bytes_per_page: if known { self.cfg.bytes_per_page } else { 0.0 },
            // One rate, vCPUs running or not.
            paused_bandwidth: 0.0,
            // Pages travel as they are sent.
            stop_batches: StopBatches::default(),
            dirtied_last_epoch: self.dirtied_last_epoch,
            held_back: self.deferred,
            unharvested: self.cfg.read_log.then(|| self.unharvested()),
            // As the executor measures the guest: on the cores it has now.
            writes: self.cfg.writes.map(|m| WriteModel {
                touched: self.growth.touched().filter(|_| self.cfg.read_log),
                ..m.scaled(self.packed())
            }),
            sweep_order: self.sweep_order.clone(),
            overcommit_ahead: self
                .cfg
                .overcommit
                .filter(|_| self.controls.cores.is_none())
                .map(|o| Packed {
                    speed: cores_share(Some(o.first_cores()), self.vcpus()),
                    bandwidth: 0.0,
                }),
        }
    }

    /// vCPUs, each busy on a core of its own.
    fn vcpus(&self) -> f64 {
        f64::from(self.cfg.vcpus.max(1))
    }

    /// The share of its speed the guest keeps on the cores the controls give it.
    fn packed(&self) -> f64 {
        cores_share(self.controls.cores, self.vcpus())
    }

    /// One guest write to a page chosen by the dirty model.
    fn write_one(&mut self) {
        let n = self.cfg.pages;
        let page = match self.cfg.dirty {
            DirtyModel::Idle => return,
            DirtyModel::Uniform { working_set, .. } => self.rng.below(working_set.clamp(1, n)),
            DirtyModel::Sequential { working_set, .. } => {
                let ws = working_set.clamp(1, n);
                let p = self.sweep_cursor % ws;
                self.sweep_cursor = (p + 1) % ws;
                p
            }
            DirtyModel::SequentialEach {
                working_set,
                last_faster,
                ..
            } => {
                let vcpus = self.sweep_writes.len();
                let share = n / vcpus as u64;
                let ws = working_set.clamp(1, share.max(1));
                // The vCPU furthest behind its share of the writes goes next.
                let weight = |j: usize| if j + 1 == vcpus { last_faster } else { 1.0 };
                let behind = |j: usize| (self.sweep_writes[j] + 1) as f64 / weight(j);
                let j = (0..vcpus)
                    .min_by(|&a, &b| behind(a).total_cmp(&behind(b)))
                    .unwrap_or(0);
                let k = self.sweep_writes[j];
                self.sweep_writes[j] += 1;
                j as u64 * share + k % ws
            }
            DirtyModel::HotCold {
                working_set,
                hot_pages,
                hot_share,
                ..
            } => {
                let ws = working_set.clamp(1, n);
                let hot = hot_pages.min(ws);
                if hot == ws || (hot > 0 && self.rng.unit() < hot_share) {
                    self.rng.below(hot.max(1))
                } else {
                    hot + self.rng.below(ws - hot)
                }
            }
        } as usize;
        self.version[page] = self.version[page].wrapping_add(1);
        if !std::mem::replace(&mut self.touched[page], true) {
            self.touched_pages += 1;
        }
        if !self.logged[page] {
            self.logged[page] = true;
            self.log.push(page as u32);
        }
    }

    /// Advances the clock; the guest writes meanwhile unless paused.
    fn advance(&mut self, secs: f64) {
        self.now += secs;
        if self.paused {
            return;
        }
        let packed = self.packed();
        let free = 1.0 - self.controls.throttle.clamp(0.0, 1.0);
        let warm = if self.now <= 0.0 {
            self.cfg.warmup_speed
        } else {
            1.0
        };
        let speed = free.powf(self.cfg.throttle_response) * packed * warm;
        let due = self.cfg.dirty.rate() * speed * secs + self.write_carry;
        let writes = due.floor();
        self.write_carry = due - writes;
        for _ in 0..writes as u64 {
            self.write_one();
        }
        if self.now - self.last_read >= LOG_READ.as_secs_f64() {
            self.read_log();
        }
    }

    /// Reads the log for the touched pages and, if the executor follows them, the sweep.
    fn read_log(&mut self) {
        self.last_read = self.now;
        self.growth.mark(self.now, self.touched_pages as f64);
        self.defer_written();
        if self.cfg.read_log {
            self.read_clock();
        }
    }

    /// Follows the writes the log shows in the sweep's order, and notes the pages' places by
    /// where they stand, as the executor does at each read.
    fn read_clock(&mut self) {
        let logged = &self.logged;
        self.clock.read(self.now, |p| logged[p as usize]);
        let state = |p: u64| {
            let p = p as usize;
            if self.in_dirty[p] || self.in_hot[p] {
                PageState::Dirty
            } else if !self.sent[p] {
                PageState::NeverSent
            } else if self.logged[p] {
                PageState::Dirty
            } else {
                PageState::Clean
            }
        };
        let taken = secs_to_duration(self.now);
        let now = self
            .clock
            .snapshot(self.now, taken, self.never_cursor, state);
        self.sweep_order = Some(Arc::new(now));
    }

    /// The sent pages in neither dirty group that the log shows written, read as the executor
    /// reads it before each forecast.
    fn unharvested(&self) -> u64 {
        // A page re-armed by its send and written again is listed twice.
        let mut pages = self.log.clone();
        pages.sort_unstable();
        pages.dedup();
        pages
            .into_iter()
            .map(|p| p as usize)
            .filter(|&p| self.logged[p] && self.sent[p] && !self.in_dirty[p] && !self.in_hot[p])
            .count() as u64
    }

    /// Reads and sends one page (its content is the version at the time of reading).
    fn send_page(&mut self, page: usize) {
        // Re-armed before it is read, as the executor's workers do: a write before the send
        // goes with the page and is not dirty after it.
        self.logged[page] = false;
        self.sent_version[page] = self.version[page];
        self.sent[page] = true;
        self.pages_sent += 1;
        self.advance(self.page_secs);
    }

    /// While hot pages wait, never-sent pages the log shows written join them, as the
    /// executor moves them at each read of the log and each harvest.
    fn defer_written(&mut self) {
        if !self.controls.defer_hot {
            return;
        }
        for i in 0..self.log.len() {
            let page = self.log[i] as usize;
            if self.logged[page] && !self.sent[page] && !self.in_hot[page] {
                self.in_hot[page] = true;
                self.hot.push_back(page as u32);
                self.never_sent -= 1;
                self.deferred += 1;
            }
        }
    }

    /// Sends up to `max` never-sent pages in address order, past those deferred.
    fn send_never_sent(&mut self, max: u64) -> u64 {
        let mut n = 0;
        while n < max && self.never_sent > 0 {
            let page = self.never_cursor as usize;
            self.never_cursor += 1;
            if self.in_hot[page] {
                continue;
            }
            self.never_sent -= 1;
            self.send_page(page);
            n += 1;
        }
        n
    }

    /// Sends up to `max` dirty pages: cold ones first, then hot ones unless they are deferred.
    fn send_dirty(&mut self, max: u64, defer_hot: bool) -> u64 {
        let mut sent = 0;
        while sent < max {
            let page = if let Some(page) = self.dirty.pop_front() {
                self.in_dirty[page as usize] = false;
                page
            } else if let Some(page) = self.hot.pop_front().filter(|_| !defer_hot) {
                self.in_hot[page as usize] = false;
                page
            } else {
                break;
            };
            if !self.resent[page as usize] {
                self.resent[page as usize] = true;
                self.resent_list.push(page);
            }
            self.send_page(page as usize);
            sent += 1;
        }
        sent
    }

    /// Clears the dirty log; sent pages written since join the dirty group.
    fn harvest(&mut self) {
        self.defer_written();
        let mut newly = 0;
        for page in std::mem::take(&mut self.log) {
            let page = page as usize;
            if !std::mem::take(&mut self.logged[page]) {
                // Re-armed when sent, or listed twice (written again after that).
                continue;
            }
            if self.sent[page] && !self.in_dirty[page] && !self.in_hot[page] {
                if self.resent[page] {
                    self.in_hot[page] = true;
                    self.hot.push_back(page as u32);
                } else {
                    self.in_dirty[page] = true;
                    self.dirty.push_back(page as u32);
                }
                newly += 1;
            }
        }
        for page in std::mem::take(&mut self.resent_list) {
            self.resent[page as usize] = false;
        }
        self.epoch += 1;
        self.dirtied_last_epoch = newly;
        self.last_harvest = self.now;
    }

    /// Runs a whole migration under `policy`.
    pub fn run(&mut self, policy: &mut dyn Policy) -> SimOutcome {
        let mut decisions = 0;
        let mut empty_sends = 0;
        let mut max_throttle: f64 = 0.0;
        let mut min_cores: Option<usize> = None;
        let max_time = self.cfg.max_time.as_secs_f64();
        while self.now < 0.0 {
            self.advance((-self.now).min(LOG_READ.as_secs_f64()));
        }
        self.now = 0.0;
        // As the executor starts its live phase: the policy's controls, and a read of the log.
        self.controls = policy.controls();
        self.defer_written();
        if self.cfg.warmup > Duration::ZERO {
            // As the executor's probe ends: the log read, and the sweep's speed measured anew.
            self.read_log();
            self.clock.speed_changes(0.0);
        }
        let end = loop {
            if decisions >= self.cfg.max_decisions || self.now > max_time {
                break SimEnd::Stalled;
            }
            decisions += 1;
            let decision = policy.decide(&self.progress());
            let cores = self.controls.cores;
            self.controls = policy.controls();
            if self.controls.cores != cores {
                // As the executor does: the sweep's speed is measured anew on the new cores.
                self.clock.speed_changes(self.now);
            }
            max_throttle = max_throttle.max(self.controls.throttle);
            if let Some(c) = self.controls.cores {
                min_cores = Some(min_cores.map_or(c, |m| m.min(c)));
            }
            match decision {
                Decision::Send { never_sent, dirty } => {
                    let sent = self.send_never_sent(never_sent)
                        + self.send_dirty(dirty, self.controls.defer_hot);
                    if sent == 0 {
                        // A real executor would spin; let time pass so the caps apply.
                        empty_sends += 1;
                        self.advance(self.page_secs);
                    }
                }
                Decision::Harvest => {
                    self.harvest();
                    self.advance(self.cfg.harvest_cost.as_secs_f64());
                }
                Decision::Switchover => break SimEnd::Completed,
                Decision::Abort(why) => break SimEnd::Aborted(why),
            }
        };
        let live = self.now;
        let live_pages = self.pages_sent;
        let epochs = self.epoch;
        let mut consistent = false;
        if end == SimEnd::Completed {
            self.paused = true;
            self.harvest();
            let left = self.never_sent;
            self.send_never_sent(left);
            let dirty = (self.dirty.len() + self.hot.len()) as u64;
            self.send_dirty(dirty, false);
            self.advance(self.cfg.switchover_cost.as_secs_f64());
            consistent = self.version == self.sent_version && self.never_sent == 0;
        }
        let converged = end == SimEnd::Completed && !policy.limit_reached();
        SimOutcome {
            total: secs_to_duration(self.now),
            live: secs_to_duration(live),
            downtime: secs_to_duration(self.now - live),
            pages_sent: self.pages_sent,
            live_pages,
            final_pages: self.pages_sent - live_pages,
            deferred: self.deferred,
            epochs,
            converged,
            decisions,
            empty_sends,
            consistent,
            max_throttle,
            min_cores,
            end_controls: self.controls,
            end,
        }
    }
}

/// Simulates one migration of `cfg` under `policy`.
pub fn simulate(cfg: SimConfig, policy: &mut dyn Policy) -> SimOutcome {
    Sim::new(cfg).run(policy)
}

/// A policy that records every decision with the progress it was made on: a simulation's
/// decisions, replayed on a fresh policy, show each forecast as the policy made it.
pub struct Recorder {
    inner: Box<dyn Policy>,
    /// Every decision so far, with its progress.
    pub log: Vec<(Progress, Decision)>,
}

impl Recorder {
    /// Records what `inner` decides.
    pub fn new(inner: Box<dyn Policy>) -> Self {
        Self {
            inner,
            log: Vec::new(),
        }
    }
}

impl Policy for Recorder {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn decide(&mut self, p: &Progress) -> Decision {
        let d = self.inner.decide(p);
        self.log.push((p.clone(), d.clone()));
        d
    }
    fn forecast(&self, p: &Progress) -> Forecast {
        self.inner.forecast(p)
    }
    fn snapshot(&self) -> Box<dyn Policy> {
        Box::new(Self {
            inner: self.inner.snapshot(),
            log: self.log.clone(),
        })
    }
    fn limit_reached(&self) -> bool {
        self.inner.limit_reached()
    }
    fn controls(&self) -> Controls {
        self.inner.controls()
    }
}
