//! The migration report (one JSON object per migration) and the progress events a running
//! migration emits.

use serde::{Deserialize, Serialize};

use crate::digest::VerifyMode;
use crate::encode::{BatchStats, Codec};

/// Phases of a migration, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Handshake, VM description, bandwidth probe.
    #[default]
    Setup,
    /// The VM runs on the source while pages are sent.
    Live,
    /// The VM is paused; the last dirty pages go.
    StopAndCopy,
    /// Digests are compared and the destination resumes (in the timeline only: no progress
    /// event is sent in the downtime).
    Switchover,
    /// The VM runs on the destination.
    Done,
}

impl Phase {
    /// Short name for progress output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Setup => "setup",
            Self::Live => "live",
            Self::StopAndCopy => "stop-and-copy",
            Self::Switchover => "switchover",
            Self::Done => "done",
        }
    }
}

/// A progress event, emitted about ten times a second while a migration runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgressEvent {
    pub phase: Phase,
    pub elapsed_ms: f64,
    /// Fraction of the work done, from the policy's own model (0..=1).
    pub fraction: f64,
    /// Expected remaining time, from the policy's model: from the setup's last event (the
    /// probe done) on; `None` (JSON `null`) while unknown (the first setup event, a forecast
    /// without a measured bandwidth). At the stop-and-copy, the forecast downtime; 0 when done.
    pub eta_ms: Option<f64>,
    /// The least and most remaining time the policy forecasts with the guest writing 25%
    /// slower and the lanes carrying 10% more than measured, or the other way round
    /// ([`crate::coordinator::forecast_range`]): wide where the time left hangs on the guest's
    /// speed (an iterating pre-copy near its threshold). Setup's last event and live events;
    /// `None` otherwise.
    #[serde(default)]
    pub eta_range_ms: Option<[f64; 2]>,
    pub wire_bytes: u64,
    pub pages_sent: u64,
    pub never_sent_pages: u64,
    pub dirty_pages: u64,
    /// Of which hot (deferred) pages.
    pub hot_pages: u64,
    /// vCPU throttle in force (0..1).
    pub throttle: f64,
    /// Cores the vCPU threads are packed onto, if over-committed.
    pub vcpu_cores: Option<usize>,
    pub epoch: u32,
    /// Recent wire throughput.
    pub bytes_per_s: f64,
    pub bound_ms: Option<f64>,
}

/// Everything measured about one migration (DESIGN §2).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Digests were equal at switchover (or verification was off) and the destination resumed.
    pub verified: bool,
    pub verify: VerifyMode,
    pub policy: String,
    /// The policy reached its switchover condition by itself (no `max_epochs` or `timeout`
    /// forced its hand).
    pub converged: bool,
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// Range workers on the source.
    pub workers: usize,
    /// Whether pages were compressed, and with which codec (`zstd`, `lz4` or `raw`) at the
    /// end: the measured choice, or forced by `--compress`.
    pub compressed: bool,
    #[serde(default)]
    pub codec: String,
    /// The codec of the stop-and-copy, and of a live phase's tail once a throttle of 0.9 or
    /// more leaves the workers the cores: with `--compress auto`, the probe's best with the
    /// vCPUs stopped (`probe.paused_bytes_per_s`), which may not be the live phase's.
    #[serde(default)]
    pub paused_codec: Option<String>,
    /// With `--compress auto`: the codecs tried while the VM ran, and what each moved.
    #[serde(default)]
    pub codec_trials: Vec<CodecTrial>,
    pub total_ms: f64,
    pub live_ms: f64,
    /// From the pause on the source to the resume on the destination (see
    /// [`SwitchoverFigures::commit_ms`]).
    pub downtime_ms: f64,
    pub eviction_ms: f64,
    /// Before the live phase, not in `total_ms`: describing the VM to the destination, which
    /// allocates its memory (`probe.dest_prealloc_ms`), and the probe.
    #[serde(default)]
    pub setup_ms: f64,
    /// The time promised before starting; `None` when the policy promises none.
    pub bound_ms: Option<f64>,
    pub within_bound: Option<bool>,
    pub wire_bytes: u64,
    /// Page records sent (a page sent twice counts twice).
    pub pages_sent: u64,
    pub pages: BatchStats,
    /// Guest bytes sent ÷ wire bytes.
    pub compression_ratio: f64,
    pub epochs: u32,
    /// Average wire throughput over the whole migration.
    pub throughput_bytes_per_s: f64,
    /// What was measured before starting, and what the bound assumes.
    pub probe: ProbeFigures,
    /// Pages sent during the stop-and-copy.
    pub final_pages: u64,
    /// Pages the log showed written before their first send, held back with the hot pages to
    /// go once, late (membound); 0 for the other policies.
    #[serde(default)]
    pub deferred_pages: u64,
    pub digest_ranges: usize,
    pub digest_ms: f64,
    /// Where the downtime went, in the order it was spent.
    #[serde(default)]
    pub switchover: SwitchoverFigures,
    pub lanes: Vec<LaneReport>,
    pub cpu: CpuFigures,
    /// The `--max-bandwidth` cap, if any.
    pub max_bandwidth_bytes_per_s: Option<f64>,
    /// Forecasts the policy made before the first page (`at_fraction` 0, the one the setup's
    /// last progress event carries) and when progress first reached 10%, 25% and 50%, to
    /// compare with `total_ms` and `downtime_ms`.
    #[serde(default)]
    pub forecasts: Vec<ForecastRecord>,
    /// The downtime forecast at the switchover decision (pages left at the policy's measured
    /// rate, plus the switchover costs measured before starting), next to `downtime_ms`.
    #[serde(default)]
    pub downtime_forecast_ms: Option<f64>,
    /// The highest vCPU throttle applied (share of vCPU time taken away, 0 = none).
    #[serde(default)]
    pub max_throttle: f64,
    /// The fewest cores the vCPU threads were packed onto (over-commit), if they were.
    #[serde(default)]
    pub min_vcpu_cores: Option<usize>,
    /// Samples taken about ten times a second, for plots (`ferry report plot`).
    #[serde(default)]
    pub timeline: Vec<Sample>,
}

/// A codec tried during the live phase (`--compress auto`): pages per second in the window
/// before (`from`) and in the trial's window (`to`), and whether it was kept.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodecTrial {
    /// Milliseconds since the live phase began, at the end of the trial.
    pub at_ms: f64,
    pub from: Codec,
    pub to: Codec,
    pub from_pages_per_s: f64,
    /// 0 when a harvest cut the trial short before it was measured (then undone).
    pub to_pages_per_s: f64,
    pub kept: bool,
}

/// What the policy forecast when progress first reached `at_fraction`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForecastRecord {
    /// The progress mark (0.10, 0.25, 0.50).
    pub at_fraction: f64,
    /// When the mark was reached, since the start of the live phase.
    pub elapsed_ms: f64,
    /// Forecast total migration time (`elapsed_ms` + the forecast time left).
    pub total_ms: f64,
    /// Forecast downtime.
    pub downtime_ms: f64,
    /// Forecast total migration time at the ends of the forecast's range
    /// ([`ProgressEvent::eta_range_ms`]); `None` in reports from before it.
    #[serde(default)]
    pub total_range_ms: Option<[f64; 2]>,
    /// The rates the forecast took and those that came, and what it would have forecast with
    /// the latter; `None` in reports from before it, and at a mark the switchover (or the
    /// policy's first throttle or over-commit) came too soon after to measure them.
    #[serde(default)]
    pub hindsight: Option<Hindsight>,
}

impl ForecastRecord {
    /// One line for [`Report::summary`]: the forecast total and its range, and with the rates
    /// that came.
    fn line(&self) -> String {
        let range = self.total_range_ms.map_or(String::new(), |[least, most]| {
            format!(" ({least:.0}–{most:.0})")
        });
        let hindsight = self.hindsight.map_or(String::new(), |h| {
            format!(
                "; {:.0} ms with the rates that came (guest {:.2}x, lanes {:.2}x)",
                h.total_ms,
                h.guest_speed_after / h.guest_speed,
                h.bandwidth_after / h.bandwidth,
            )
        });
        format!(
            "forecast at {:.0}% ({:.0} ms in): total {:.0} ms{range}, downtime {:.1} ms{hindsight}",
            100.0 * self.at_fraction,
            self.elapsed_ms,
            self.total_ms,
            self.downtime_ms,
        )
    }
}

/// What a forecast took the rates to be at its progress mark, what they came to after it
/// (from the mark to the end of the live phase, or to the policy's first throttle or
/// over-commit if that came after the mark: the policies price those controls' effects
/// themselves), and the forecast the policy as it stood at the mark makes from them
/// ([`crate::coordinator::Progress::as_it_went`]). Where `total_ms` holds the actual total and
/// the forecast did not, the rates moved; where neither holds it, the model missed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Hindsight {
    /// The guest's speed against the probe's, throttle aside: measured at the mark (over the
    /// second before), and after it.
    pub guest_speed: f64,
    pub guest_speed_after: f64,
    /// Wire bytes/s the lanes delivered: at the mark (over the second before), and after it.
    pub bandwidth: f64,
    pub bandwidth_after: f64,
    /// Wire bytes a page: at the mark, and after it.
    pub bytes_per_page: f64,
    pub bytes_per_page_after: f64,
    /// Total migration time forecast at the mark from the rates that came.
    pub total_ms: f64,
}

/// One point of the migration's timeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Since the start of the live phase.
    pub t_ms: f64,
    pub phase: Phase,
    /// Wire bytes each lane has carried so far (cumulative).
    pub lane_bytes: Vec<u64>,
    /// Pages in the dirty group (sent, written since), hot pages included.
    pub dirty_pages: u64,
    /// Of which hot pages (written again within an epoch of being resent), deferred.
    pub hot_pages: u64,
    pub never_sent_pages: u64,
    /// vCPU throttle in force (0..1).
    pub throttle: f64,
    /// Cores the vCPU threads were packed onto, if over-committed.
    pub vcpu_cores: Option<usize>,
    /// The policy's forecast of the time left.
    pub eta_ms: f64,
}

/// The downtime, step by step (milliseconds): `downtime_ms` is the sum of every step but
/// `hash_ms`, which overlaps `final_pages_ms`, `drain_ms`, which comes before the pause, and
/// `ack_ms`, which comes after the resume (`live_ms + downtime_ms + ack_ms = total_ms`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct SwitchoverFigures {
    /// Before the pause, the VM still running: waiting until the destination had applied
    /// every batch sent, each time the policy decided to switch over (it decides again on a
    /// harvest after each wait). Part of the live time, not of the downtime.
    #[serde(default)]
    pub drain_ms: f64,
    /// Stopping the vCPUs.
    pub pause_ms: f64,
    /// The last dirty-log harvest, and listing the pages left.
    pub harvest_ms: f64,
    /// The stop-and-copy pages, until the destination acknowledged them all, while the
    /// source hashed its memory (`hash_ms`) and saved the VM state; the longer of the two.
    pub final_pages_ms: f64,
    /// The source's digests (overlapping `final_pages_ms`).
    pub hash_ms: f64,
    /// Pages the source hashed for its digests in the downtime: with `--verify full` only
    /// those that may have changed since it hashed them while the VM ran.
    #[serde(default)]
    pub hash_pages: u64,
    /// Pages the source hashed while the VM ran (`--verify full`; a page can count more than
    /// once).
    #[serde(default)]
    pub live_hash_pages: u64,
    /// Sending the VM state, the destination's restore and digests, and comparing them.
    pub state_ms: f64,
    /// Commit, until the destination resumed the VM: the Commit's way there (half the
    /// probe's round trip) and the destination's own time until it ran the vCPUs.
    pub commit_ms: f64,
    /// After the downtime: until the source had the destination's reply (part of the total,
    /// as the source cannot let go of its VM before).
    #[serde(default)]
    pub ack_ms: f64,
}

/// CPU time spent on the migration (not running the guest).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CpuFigures {
    /// The source process, minus its vCPU threads.
    pub source_s: f64,
    /// Of which the range workers.
    pub workers_s: f64,
    /// The destination process while receiving.
    pub destination_s: f64,
    /// Per GiB of guest pages sent.
    pub source_s_per_gib: f64,
    pub destination_s_per_gib: f64,
}

/// Measured before the migration: the lanes (a probe of discarded messages) and the encoding
/// of a sample of 1024 pages spread over memory with each codec, by as many threads at once
/// as there will be workers (at most one a core); `*_us_per_page` is each thread's time a
/// page.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ProbeFigures {
    pub lane_bytes_per_s: f64,
    pub zstd_wire_bytes_per_page: f64,
    pub zstd_us_per_page: f64,
    #[serde(default)]
    pub lz4_wire_bytes_per_page: f64,
    #[serde(default)]
    pub lz4_us_per_page: f64,
    pub raw_wire_bytes_per_page: f64,
    pub raw_us_per_page: f64,
    /// The wire rate and bytes per page of the chosen mode, which the bound uses.
    pub bytes_per_s: f64,
    pub wire_bytes_per_page: f64,
    /// The wire rate of the chosen mode with the vCPUs stopped, which the stop-and-copy and
    /// throttled forecasts use: the workers encode at their CPU time's rate, at most what the
    /// lanes carry.
    #[serde(default)]
    pub paused_bytes_per_s: Option<f64>,
    /// The guest's writes, fitted during the probe: a working set (pages) written at first at
    /// `write_pages_per_s`, plus a drift over all memory (pages/s). `None` without a fit.
    #[serde(default)]
    pub write_pages_per_s: Option<f64>,
    #[serde(default)]
    pub working_set_pages: Option<f64>,
    #[serde(default)]
    pub write_drift_pages_per_s: Option<f64>,
    /// An empty message's round trip over the lanes (the switchover makes three), timed
    /// with the vCPUs paused, as they are at switchover.
    #[serde(default)]
    pub round_trip_ms: f64,
    /// How long the vCPUs stood still for that, before the live phase.
    #[serde(default)]
    pub pause_ms: f64,
    /// How long the destination took to allocate guest memory before it was ready (`None`
    /// if it allocates pages as they arrive: `ferry listen --no-prealloc`).
    #[serde(default)]
    pub dest_prealloc_ms: Option<f64>,
    /// How fast the vCPUs were expected to run once pages flow, against during the write
    /// probe: the share of their CPU time they kept while every worker encoded, for the share
    /// of the time the workers would be busy. The forecasts take it until the vCPUs' CPU time
    /// is measured in the live phase (the first from before the first page).
    #[serde(default)]
    pub busy_guest_speed: Option<f64>,
}

/// Per-lane figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LaneReport {
    pub lane: usize,
    pub bytes: u64,
    pub messages: u64,
    pub throughput_bytes_per_s: f64,
    /// Why the lane failed, if it did.
    pub failed: Option<String>,
}

impl Report {
    /// A human summary, a few lines.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let bound = match self.bound_ms {
            Some(b) => format!(
                "{:.0} ms ({})",
                b,
                if self.within_bound == Some(true) {
                    "kept"
                } else {
                    "EXCEEDED"
                }
            ),
            None => "none promised".into(),
        };
        let trials = self
            .codec_trials
            .iter()
            .map(|t| {
                let to = match t.to_pages_per_s {
                    r if r > 0.0 => format!(
                        "{:.0}k pages/s, {}",
                        r / 1e3,
                        if t.kept { "kept" } else { "undone" }
                    ),
                    _ => "cut short by a harvest, undone".into(),
                };
                format!(
                    "\ncodec trial at {:.1} s: {} {:.0}k -> {} {to}",
                    t.at_ms / 1e3,
                    t.from,
                    t.from_pages_per_s / 1e3,
                    t.to,
                )
            })
            .collect::<String>();
        let trials = match &self.paused_codec {
            Some(c) if *c != self.codec => {
                format!(
                    "{trials}\ncodec {} live, {c} once the workers had the cores",
                    self.codec
                )
            }
            _ => trials,
        };
        let forecasts = self
            .forecasts
            .iter()
            .filter(|f| f.at_fraction >= 0.25)
            .map(|f| format!("\n{}", f.line()))
            .collect::<String>();
        let downtime = self.downtime_forecast_ms.map_or(String::new(), |d| {
            format!("\ndowntime forecast at switchover {d:.1} ms")
        });
        format!(
            "migration {}: policy {}{}, {} MiB, {} vCPU(s)\n\
             total {:.0} ms (live {:.0} ms, downtime {:.1} ms, eviction {:.0} ms) after {:.0} ms of setup; bound {}\n\
             wire {:.1} MiB at {:.1} MiB/s, compression {:.2}x, {} epochs, {} pages sent ({} in stop-and-copy)\n\
             pages: {} zero, {} duplicate, {} zstd, {} lz4, {} raw\n\
             memory {} at switchover (verify={}, {} ranges, {:.1} ms){forecasts}{downtime}{}",
            if self.verified { "verified" } else { "NOT verified" },
            self.policy,
            if self.converged { "" } else { " (did not converge: a limit forced the switchover)" },
            mib(self.mem_bytes),
            self.vcpus,
            self.total_ms,
            self.live_ms,
            self.downtime_ms,
            self.eviction_ms,
            self.setup_ms,
            bound,
            mib(self.wire_bytes),
            self.throughput_bytes_per_s / (1 << 20) as f64,
            self.compression_ratio,
            self.epochs,
            self.pages_sent,
            self.final_pages,
            self.pages.zero.pages,
            self.pages.duplicate.pages,
            self.pages.compressed.pages,
            self.pages.lz4.pages,
            self.pages.raw.pages,
            match (self.verify, self.verified) {
                (VerifyMode::Off, _) => "not compared",
                (_, true) => "identical",
                (_, false) => "DIFFERENT",
            },
            self.verify,
            self.digest_ranges,
            self.digest_ms,
            trials,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary shows the forecasts from 25% on, each with its range and, where the live
    /// phase ran long enough after the mark, the forecast from the rates that came; and the
    /// downtime forecast at the switchover.
    #[test]
    fn the_summary_shows_the_forecasts_and_their_hindsight() {
        let mark = |at_fraction, total_ms| ForecastRecord {
            at_fraction,
            elapsed_ms: 1000.0 * at_fraction,
            total_ms,
            downtime_ms: 20.0,
            total_range_ms: Some([total_ms - 100.0, total_ms + 200.0]),
            hindsight: None,
        };
        let report = Report {
            forecasts: vec![
                mark(0.1, 1500.0),
                ForecastRecord {
                    hindsight: Some(Hindsight {
                        guest_speed: 0.4,
                        guest_speed_after: 0.5,
                        bandwidth: 100e6,
                        bandwidth_after: 90e6,
                        bytes_per_page: 1600.0,
                        bytes_per_page_after: 1600.0,
                        total_ms: 2150.0,
                    }),
                    ..mark(0.25, 2000.0)
                },
                mark(0.5, 2100.0),
            ],
            downtime_forecast_ms: Some(21.5),
            ..Report::default()
        };
        let s = report.summary();
        let lines: Vec<&str> = s.lines().filter(|l| l.contains("forecast")).collect();
        assert_eq!(
            lines,
            [
                "forecast at 25% (250 ms in): total 2000 ms (1900–2200), downtime 20.0 ms; \
                 2150 ms with the rates that came (guest 1.25x, lanes 0.90x)",
                "forecast at 50% (500 ms in): total 2100 ms (2000–2300), downtime 20.0 ms",
                "downtime forecast at switchover 21.5 ms",
            ],
            "{s}"
        );
    }
}
