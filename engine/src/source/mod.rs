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
//! The coordinator only decides; this module reads pages, encodes them and hands batches to
//! the transport, which pipelines them over its lanes with a window of unacknowledged batches.

use std::time::{Duration, Instant};

use ferry_transport::SessionSender;

use crate::bitmap::Bitmap;
use crate::coordinator::{self, Decision, PolicyConfig, PolicyKind, Progress};
use crate::digest::{self, VerifyMode};
use crate::dirty::{DirtyError, DirtyTracker};
use crate::encode::{BatchEncoder, BatchStats, EncodeError, EncoderConfig};
use crate::memory::{MemoryError, PAGE_SHIFT, PAGE_SIZE};
use crate::proto::{self, Describe, Digests, SwitchoverHeader, Tag};
use crate::report::{LaneReport, Phase, ProgressEvent, Report};
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
            probe_time: Duration::from_millis(300),
            reply_timeout: Duration::from_secs(60),
            fault: None,
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

/// Recent-throughput meter over a sliding window.
struct Meter {
    samples: std::collections::VecDeque<(Instant, u64)>,
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
        self.samples.push_back((now, total));
        while self.samples.len() > 2 && now.duration_since(self.samples[0].0) > self.window {
            self.samples.pop_front();
        }
    }
    fn rate(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

/// One migration of a running VM to the destination behind `tx`.
struct Migration<'a> {
    vm: &'a Vm,
    tracker: &'a dyn DirtyTracker,
    tx: &'a SessionSender,
    cfg: &'a SourceConfig,
    t0: Instant,
    epoch: u32,
    never_sent: Bitmap,
    sent: Bitmap,
    dirty: Bitmap,
    scratch: Bitmap,
    cursor_never: u64,
    cursor_dirty: u64,
    enc: BatchEncoder,
    stats: BatchStats,
    wire_bytes: u64,
    pages_sent: u64,
    dirtied_last_epoch: u64,
    last_harvest: Instant,
    meter: Meter,
    probe_bpp: f64,
    probe_bw: f64,
    bound: Option<Duration>,
    page_buf: Vec<u8>,
    pick: Vec<u64>,
    fault_sent: bool,
    corrupt_next: bool,
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
    let mut m = Migration {
        vm,
        tracker,
        tx,
        cfg,
        t0: Instant::now(),
        epoch: 0,
        never_sent,
        sent: Bitmap::new(span),
        dirty: Bitmap::new(span),
        scratch: Bitmap::new(span),
        cursor_never: 0,
        cursor_dirty: 0,
        enc: BatchEncoder::new(cfg.encoder.clone()),
        stats: BatchStats::default(),
        wire_bytes: 0,
        pages_sent: 0,
        dirtied_last_epoch: 0,
        last_harvest: Instant::now(),
        meter: Meter::new(),
        probe_bpp: PAGE_SIZE as f64,
        probe_bw: 0.0,
        bound: None,
        page_buf: vec![0; PAGE_SIZE],
        pick: Vec::new(),
        fault_sent: false,
        corrupt_next: false,
    };
    let mut result = m.run(progress);
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

impl Migration<'_> {
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
        self.expect_reply(Tag::Ready)?;
        self.probe()?;
        self.bound = coordinator::bound(
            self.cfg.policy,
            mem.size(),
            self.probe_bw,
            self.probe_bpp,
            &self.cfg.policy_cfg,
        );
        progress(&self.event(Phase::Setup));

        // Live phase.
        let mut policy = coordinator::make_policy(self.cfg.policy, &self.cfg.policy_cfg);
        self.t0 = Instant::now();
        self.last_harvest = self.t0;
        let mut last_event = self.t0;
        loop {
            let now = Instant::now();
            self.meter.add(now, self.wire_bytes);
            if now.duration_since(last_event) >= Duration::from_millis(100) {
                last_event = now;
                self.check_destination()?;
                let mut ev = self.event(Phase::Live);
                let f = policy.forecast(&self.progress());
                ev.fraction = f.fraction_done;
                ev.eta_ms = f.remaining.as_secs_f64() * 1e3;
                progress(&ev);
            }
            match policy.decide(&self.progress()) {
                Decision::Send { never_sent, dirty } => {
                    self.pick.clear();
                    let mut pick = std::mem::take(&mut self.pick);
                    self.never_sent
                        .take(&mut self.cursor_never, never_sent as usize, &mut pick);
                    self.dirty
                        .take(&mut self.cursor_dirty, dirty as usize, &mut pick);
                    pick.sort_unstable();
                    self.tracker.clear(&pick)?;
                    let r = self.send_pages(&pick);
                    self.pick = pick;
                    r?;
                }
                Decision::Harvest => self.harvest()?,
                Decision::Switchover => break,
                Decision::Abort(why) => return Err(MigrateError::Policy(why)),
            }
        }
        self.flush()?;

        // Stop-and-copy.
        let paused_at = Instant::now();
        self.vm.pause()?;
        let mut guard = PauseGuard {
            vm: self.vm,
            armed: true,
        };
        progress(&self.event(Phase::StopAndCopy));
        self.harvest()?;
        let mut rest: Vec<u64> = self.never_sent.iter_ones().collect();
        rest.extend(self.dirty.iter_ones());
        rest.sort_unstable();
        self.never_sent.clear_all();
        self.dirty.clear_all();
        let final_pages = rest.len() as u64;
        if self.cfg.fault == Some(Fault::CorruptPage) {
            self.corrupt_next = true;
        }
        self.send_pages(&rest)?;
        self.flush()?;
        self.tx.barrier()?;

        // Switchover: state, digests compared, commit.
        progress(&self.event(Phase::Switchover));
        let state = self.vm.save_state()?;
        let salt = self.t0.elapsed().as_nanos() as u64;
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
        let hash_start = Instant::now();
        let ours = digest::digests(
            mem,
            self.cfg.verify,
            self.cfg.digest_range,
            salt,
            self.cfg.digest_threads,
        )?;
        let ours_ms = hash_start.elapsed().as_secs_f64() * 1e3;
        let theirs: Digests = proto::from_json("Digests", &self.expect_reply(Tag::Digests)?)?;
        let bad = digest::mismatches(&ours, &theirs.digests);
        if !bad.is_empty() {
            return Err(MigrateError::Mismatch {
                ranges: bad.len(),
                total: ours.len(),
                first_gpa: bad[0] as u64 * self.cfg.digest_range,
            });
        }
        self.tx.send(Tag::Commit as u16, Vec::new())?;
        self.expect_reply(Tag::Resumed)?;
        guard.armed = false;
        let done = Instant::now();

        let total = done.duration_since(self.t0).as_secs_f64() * 1e3;
        let mut report = Report {
            verified: true,
            verify: self.cfg.verify,
            policy: self.cfg.policy.to_string(),
            converged: !policy.limit_reached(),
            mem_bytes: mem.size(),
            vcpus: self.vm.vcpu_count() as u32,
            total_ms: total,
            live_ms: paused_at.duration_since(self.t0).as_secs_f64() * 1e3,
            downtime_ms: done.duration_since(paused_at).as_secs_f64() * 1e3,
            eviction_ms: total,
            bound_ms: self.bound.map(|b| b.as_secs_f64() * 1e3),
            within_bound: self.bound.map(|b| total <= b.as_secs_f64() * 1e3),
            wire_bytes: self.wire_bytes,
            pages_sent: self.pages_sent,
            pages: self.stats,
            compression_ratio: (self.pages_sent * PAGE_SIZE as u64) as f64
                / self.wire_bytes.max(1) as f64,
            epochs: self.epoch,
            throughput_bytes_per_s: self.wire_bytes as f64 / (total / 1e3).max(1e-9),
            probe_bytes_per_s: self.probe_bw,
            probe_wire_bytes_per_page: self.probe_bpp,
            final_pages,
            digest_ranges: ours.len(),
            digest_ms: ours_ms.max(theirs.hash_ms),
            lanes: Vec::new(),
        };
        for (i, l) in self.tx.stats().iter().enumerate() {
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
        progress(&ev);
        Ok(report)
    }

    fn progress(&self) -> Progress {
        let now = Instant::now();
        Progress {
            elapsed: now.duration_since(self.t0),
            since_harvest: now.duration_since(self.last_harvest),
            epoch: self.epoch,
            total_pages: self.sent.len(),
            never_sent: self.never_sent.count(),
            dirty: self.dirty.count(),
            pages_sent: self.pages_sent,
            bytes_sent: self.wire_bytes,
            bandwidth: match self.meter.rate() {
                r if r > 0.0 => r,
                _ => self.probe_bw,
            },
            bytes_per_page: if self.pages_sent > 0 {
                self.wire_bytes as f64 / self.pages_sent as f64
            } else {
                self.probe_bpp
            },
            dirtied_last_epoch: self.dirtied_last_epoch,
        }
    }

    fn event(&self, phase: Phase) -> ProgressEvent {
        let p = self.progress();
        ProgressEvent {
            phase,
            elapsed_ms: p.elapsed.as_secs_f64() * 1e3,
            fraction: 0.0,
            eta_ms: 0.0,
            wire_bytes: self.wire_bytes,
            pages_sent: self.pages_sent,
            never_sent_pages: p.never_sent,
            dirty_pages: p.dirty,
            epoch: self.epoch,
            bytes_per_s: p.bandwidth,
            bound_ms: self.bound.map(|b| b.as_secs_f64() * 1e3),
        }
    }

    /// Harvests the dirty log: pages already sent and written since join the dirty group.
    fn harvest(&mut self) -> Result<(), MigrateError> {
        self.scratch.clear_all();
        self.tracker.harvest(&mut self.scratch)?;
        self.dirtied_last_epoch = self.dirty.or_masked(&self.scratch, &self.sent);
        self.epoch += 1;
        self.last_harvest = Instant::now();
        Ok(())
    }

    /// Reads and encodes `pages` (their dirty bits already cleared) into batches.
    fn send_pages(&mut self, pages: &[u64]) -> Result<(), MigrateError> {
        let mem = self.vm.memory();
        for &p in pages {
            let gpa = p << PAGE_SHIFT;
            mem.read(gpa, &mut self.page_buf)?;
            if std::mem::take(&mut self.corrupt_next) {
                self.page_buf[100] ^= 0x5a;
            }
            let page: &[u8; PAGE_SIZE] = self.page_buf[..].try_into().expect("one page");
            self.enc.push(gpa, self.epoch, page)?;
            self.sent.set(p);
            self.pages_sent += 1;
            if self.enc.is_full() {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Sends the current batch, if any.
    fn flush(&mut self) -> Result<(), MigrateError> {
        if self.enc.is_empty() {
            return Ok(());
        }
        let (payload, stats) = self.enc.finish();
        self.wire_bytes += payload.len() as u64;
        self.stats += stats;
        if !self.fault_sent {
            if let Some(f) = self.cfg.fault {
                self.fault_sent = self.inject(f, &payload)?;
            }
        }
        self.tx.send(Tag::Pages as u16, payload)?;
        Ok(())
    }

    /// Sends one bad batch before `payload` for the faults that need one.
    fn inject(&mut self, f: Fault, payload: &[u8]) -> Result<bool, MigrateError> {
        match f {
            Fault::GpaOutsideMemory => {
                let mut e = BatchEncoder::new(self.cfg.encoder.clone());
                let outside = self.vm.memory().page_span() << PAGE_SHIFT;
                e.push(outside + (1 << 30), self.epoch, &[0x42; PAGE_SIZE])?;
                self.tx.send(Tag::Pages as u16, e.finish().0)?;
            }
            Fault::TruncatedBatch => {
                let cut = payload.len() / 2;
                self.tx.send(Tag::Pages as u16, payload[..cut].to_vec())?;
            }
            Fault::CorruptPage => return Ok(false),
        }
        Ok(true)
    }

    /// Measures what the lanes carry and what one core encodes, before starting.
    fn probe(&mut self) -> Result<(), MigrateError> {
        // Encoder sample: up to 1024 pages spread over memory.
        let mem = self.vm.memory();
        let span = mem.page_span();
        let step = (span / 1024).max(1);
        let mut enc = BatchEncoder::new(self.cfg.encoder.clone());
        let t = Instant::now();
        let mut n = 0u64;
        let mut bytes = 0u64;
        let mut p = 0;
        while p < span {
            if mem.read(p << PAGE_SHIFT, &mut self.page_buf).is_ok() {
                let page: &[u8; PAGE_SIZE] = self.page_buf[..].try_into().expect("one page");
                enc.push(p << PAGE_SHIFT, 0, page)?;
                n += 1;
                if enc.is_full() {
                    bytes += enc.finish().0.len() as u64;
                }
            }
            p += step;
        }
        bytes += enc.finish().0.len() as u64;
        let enc_secs = t.elapsed().as_secs_f64().max(1e-6);
        self.probe_bpp = (bytes as f64 / n.max(1) as f64).max(16.0);
        let encode_rate = bytes as f64 / enc_secs;

        // Lane probe: 1 MiB messages the destination discards, for at most probe_time.
        let t = Instant::now();
        let mut sent = 0u64;
        let chunk = vec![0xa5u8; 1 << 20];
        while t.elapsed() < self.cfg.probe_time && sent < (1 << 30) {
            self.tx.send(Tag::Probe as u16, chunk.clone())?;
            sent += chunk.len() as u64;
        }
        self.tx.barrier()?;
        let lane_rate = sent as f64 / t.elapsed().as_secs_f64().max(1e-6);
        self.probe_bw = lane_rate.min(encode_rate);
        Ok(())
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
        let (tag, payload) = self.tx.recv_reply(self.cfg.reply_timeout)?;
        if tag == want as u16 {
            return Ok(payload);
        }
        Err(unexpected_reply(tag, &payload))
    }
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
