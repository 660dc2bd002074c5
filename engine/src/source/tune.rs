//! `--compress auto` during the migration: keeps the codec that moves the most pages per
//! second, as measured, not as modelled.
//!
//! The probe's choice models each side alone: what the workers' cores encode and what the
//! lanes carry. It cannot see a destination that shares the cores, the kernel's network work,
//! or a guest that takes cores back. So after every window of sending the tuner looks at how
//! full the lanes were. Two windows in a row well under the lanes' measured rate mean
//! something other than the lanes is the bottleneck: the next faster codec is tried for a
//! window, unless the lanes would cap it below what moves now (their rate ÷ its wire bytes
//! per page). Two full windows mean the lanes are the bottleneck: the next stronger codec may
//! move more pages, and is tried, unless the workers would cap it below what moves now (the
//! pages per second the probe saw them encode). A trial is kept when it moves at least
//! [`GAIN`] times the pages per second of the best of the windows that called for it (one
//! window that dipped, as when the guest takes a core for a moment, would let a trial win
//! that moves fewer pages than the codec usually does); otherwise the codec goes back, and
//! the one tried waits twice as many windows as last time before it is tried again. A harvest
//! cuts the window short: a trial it cuts starts its window again after the harvest, once (a
//! policy that harvests every second would otherwise cut every trial it meets, as timebound
//! did).
//!
//! Pages are compared per second rather than bytes, because pages are what the migration
//! needs moved; the mixed content of guest memory makes any two windows' pages alike.

use std::time::{Duration, Instant};

use crate::encode::Codec;
use crate::report::CodecTrial;

/// Length of a measuring window.
const WINDOW: Duration = Duration::from_millis(300);
/// Time after a switch (or a pause in sending) before a window starts, so that batches
/// encoded before it have left the lanes' queues.
const SETTLE: Duration = Duration::from_millis(100);
/// Lane use below which the lanes are waiting for something else.
const UNDERUSED: f64 = 0.85;
/// Lane use above which the lanes are the bottleneck.
const FULL: f64 = 0.95;
/// How many times the pages per second a trial must move to be kept.
pub const GAIN: f64 = 1.05;
/// Windows in a row that must agree before a trial.
const STREAK: u32 = 2;

/// Counters at the start of a window.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    pages: u64,
    wire: u64,
}

/// Chooses the codec while the VM runs (see the module documentation).
#[derive(Debug)]
pub(super) struct Tuner {
    codec: Codec,
    /// Wire bytes per second the lanes carry (the probe's measure, or the cap).
    lane_rate: f64,
    /// Wire bytes per page of each codec (in [`Codec::ALL`]'s order), as the probe measured
    /// them on a sample of memory.
    bpp: [f64; 3],
    /// Pages per second the workers encode with each codec, as the probe measured them, every
    /// worker's thread encoding at once: a ceiling, as the lanes' own work takes cores too.
    encode: [f64; 3],
    t0: Instant,
    settle_until: Instant,
    mark: Option<Mark>,
    /// Windows in a row with the lanes underused (negative: full).
    streak: i32,
    /// The most pages per second of the windows in the streak.
    streak_rate: f64,
    /// The codec before the trial in progress, and its pages per second.
    trial: Option<(Codec, f64)>,
    /// A harvest has cut the trial in progress once.
    cut: bool,
    /// Per codec (in [`Codec::ALL`]'s order): windows left before it may be tried again,
    /// and the wait after its last failed trial.
    wait: [u32; 3],
    backoff: [u32; 3],
    trials: Vec<CodecTrial>,
}

fn index(c: Codec) -> usize {
    Codec::ALL.iter().position(|&x| x == c).unwrap_or(0)
}

/// The next codec in [`Codec::ALL`] (faster, larger on the wire) or the previous (stronger).
fn neighbour(c: Codec, faster: bool) -> Option<Codec> {
    let i = index(c);
    if faster {
        Codec::ALL.get(i + 1).copied()
    } else {
        i.checked_sub(1).map(|i| Codec::ALL[i])
    }
}

impl Tuner {
    /// A tuner starting at `now` with the probe's `codec`, lanes carrying `lane_rate` wire
    /// bytes per second, and each codec's wire bytes per page `bpp` and pages per second the
    /// workers encode `encode` (both in [`Codec::ALL`]'s order).
    pub fn new(
        codec: Codec,
        lane_rate: f64,
        bpp: [f64; 3],
        encode: [f64; 3],
        now: Instant,
    ) -> Self {
        Self {
            codec,
            lane_rate,
            bpp,
            encode,
            t0: now,
            settle_until: now + SETTLE,
            mark: None,
            streak: 0,
            streak_rate: 0.0,
            trial: None,
            cut: false,
            wait: [0; 3],
            backoff: [1; 3],
            trials: Vec::new(),
        }
    }

    /// Ends the tuning: the codec to keep (a trial in progress is undone, as it was never
    /// measured) and the trials made.
    pub fn finish(self) -> (Codec, Vec<CodecTrial>) {
        let codec = self.trial.map_or(self.codec, |(from, _)| from);
        (codec, self.trials)
    }

    /// Sending paused (a harvest): the window in progress measures nothing and is dropped.
    /// A trial in progress starts its window again the first time; the second time it is
    /// undone as if it had lost (its codec returned): left running across harvests, which
    /// come every few tens of milliseconds in a policy's tail, it would never complete a
    /// window and run unmeasured to the end.
    pub fn restart(&mut self, now: Instant) -> Option<Codec> {
        self.new_window(now);
        let (from, from_rate) = self.trial?;
        if !self.cut {
            self.cut = true;
            return None;
        }
        self.trial = None;
        self.cut = false;
        self.record(now, from, from_rate, 0.0, false);
        self.lost(self.codec);
        Some(self.switch(from, now))
    }

    /// Records the trial of the current codec against `from`.
    fn record(&mut self, now: Instant, from: Codec, from_rate: f64, rate: f64, kept: bool) {
        self.trials.push(CodecTrial {
            at_ms: now.duration_since(self.t0).as_secs_f64() * 1e3,
            from,
            to: self.codec,
            from_pages_per_s: from_rate,
            to_pages_per_s: rate,
            kept,
        });
    }

    fn new_window(&mut self, now: Instant) {
        self.mark = None;
        self.settle_until = now + SETTLE;
    }

    /// `tried` lost its trial: it waits twice as many windows as last time.
    fn lost(&mut self, tried: Codec) {
        let i = index(tried);
        self.backoff[i] *= 2;
        self.wait[i] = self.backoff[i];
    }

    /// Takes the encoded pages and wire bytes so far at `now`; returns the codec to switch
    /// to, if any.
    pub fn observe(&mut self, now: Instant, pages: u64, wire: u64) -> Option<Codec> {
        if now < self.settle_until {
            return None;
        }
        let here = Mark {
            at: now,
            pages,
            wire,
        };
        let Some(m) = self.mark else {
            self.mark = Some(here);
            return None;
        };
        let secs = now.duration_since(m.at);
        if secs < WINDOW {
            return None;
        }
        self.mark = Some(here);
        let secs = secs.as_secs_f64();
        let rate = pages.saturating_sub(m.pages) as f64 / secs;
        let window_wire = wire.saturating_sub(m.wire) as f64;
        let used = window_wire / secs / self.lane_rate.max(1.0);

        if let Some((from, from_rate)) = self.trial.take() {
            self.cut = false;
            let kept = rate >= from_rate * GAIN;
            self.record(now, from, from_rate, rate, kept);
            self.streak = 0;
            if kept {
                self.backoff[index(self.codec)] = 1;
                return None;
            }
            self.lost(self.codec);
            return Some(self.switch(from, now));
        }

        for w in &mut self.wait {
            *w = w.saturating_sub(1);
        }
        let streak = match used {
            u if u < UNDERUSED => self.streak.max(0) + 1,
            u if u > FULL => self.streak.min(0) - 1,
            _ => 0,
        };
        self.streak_rate = if streak.signum() == self.streak.signum() && streak != 0 {
            self.streak_rate.max(rate)
        } else {
            rate
        };
        self.streak = streak;
        if self.streak.unsigned_abs() < STREAK {
            return None;
        }
        let faster = self.streak > 0;
        let next = neighbour(self.codec, faster).filter(|&c| self.wait[index(c)] == 0)?;
        // The lanes cap a faster codec at their rate ÷ its wire bytes per page (the probe's
        // figure, scaled by how this window's pages compare with the probe's sample); the
        // workers cap a stronger one at what they encode. Below GAIN × the rate it must beat,
        // it cannot win: not worth a trial, which would move fewer pages for a window.
        let ceiling = if faster {
            let bpp_now = window_wire / pages.saturating_sub(m.pages).max(1) as f64;
            let scale = bpp_now / self.bpp[index(self.codec)].max(1.0);
            self.lane_rate / (self.bpp[index(next)] * scale).max(1.0)
        } else {
            self.encode[index(next)]
        };
        if ceiling < self.streak_rate * GAIN {
            return None;
        }
        self.trial = Some((self.codec, self.streak_rate));
        self.streak = 0;
        Some(self.switch(next, now))
    }

    fn switch(&mut self, to: Codec, now: Instant) -> Codec {
        self.codec = to;
        self.new_window(now);
        to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tuner starting now with `start`, lanes carrying `lane_rate`, [`bpp`]'s bytes per
    /// page and workers that encode `encode` pages per second with each codec.
    fn tuner(start: Codec, lane_rate: f64, encode: [f64; 3]) -> Tuner {
        Tuner::new(
            start,
            lane_rate,
            Codec::ALL.map(bpp),
            encode,
            Instant::now(),
        )
    }

    /// Drives a tuner with a simulated pipeline: each codec moves `pages_per_s(codec)` pages
    /// at [`bpp`]'s bytes per page on the wire; returns the codec after `secs` and the tuner.
    /// The workers could encode any codec at 1M pages/s.
    fn drive(
        start: Codec,
        lane_rate: f64,
        secs: f64,
        pages_per_s: impl Fn(Codec) -> f64,
    ) -> (Codec, Tuner) {
        let t = tuner(start, lane_rate, [1e6; 3]);
        drive_tuner(t, secs, f64::INFINITY, |c, _| pages_per_s(c))
    }

    /// As [`drive`], for a tuner made by the caller, with pages per second that also depend
    /// on the time in seconds, and a harvest every `harvest_every` seconds.
    fn drive_tuner(
        mut t: Tuner,
        secs: f64,
        harvest_every: f64,
        pages_per_s: impl Fn(Codec, f64) -> f64,
    ) -> (Codec, Tuner) {
        let (t0, tick) = (t.t0, 0.1);
        let (mut codec, mut pages, mut wire) = (t.codec, 0.0f64, 0.0f64);
        let (mut now, mut harvest) = (0.0, harvest_every);
        while now < secs {
            let rate = pages_per_s(codec, now);
            now += tick;
            pages += rate * tick;
            wire += rate * bpp(codec) * tick;
            let at = t0 + Duration::from_secs_f64(now);
            if now >= harvest {
                harvest += harvest_every;
                if let Some(c) = t.restart(at) {
                    codec = c;
                }
            } else if let Some(c) = t.observe(at, pages as u64, wire as u64) {
                codec = c;
            }
        }
        (codec, t)
    }

    fn bpp(c: Codec) -> f64 {
        match c {
            Codec::Zstd => 1600.0,
            Codec::Lz4 => 2000.0,
            Codec::Raw => 3100.0,
        }
    }

    #[test]
    fn cores_the_bottleneck_moves_to_the_faster_codec_that_wins() {
        // Lanes carry 220 MB/s; the shared cores move 76k zstd pages/s (lanes 55% full) and
        // 95k LZ4 pages/s, and raw would fill the lanes at 71k pages/s.
        let lane = 220e6;
        let rate = |c| match c {
            Codec::Zstd => 76e3,
            Codec::Lz4 => 95e3,
            Codec::Raw => lane / bpp(Codec::Raw),
        };
        let (codec, t) = drive(Codec::Zstd, lane, 6.0, rate);
        assert_eq!(codec, Codec::Lz4);
        let trials = t.finish().1;
        assert!(trials[0].kept && trials[0].from == Codec::Zstd && trials[0].to == Codec::Lz4);
        // LZ4 fills the lanes to 86%: not underused, not full; nothing else is tried.
        assert_eq!(trials.len(), 1, "{trials:?}");
    }

    #[test]
    fn a_trial_that_loses_is_undone_and_waits_longer_each_time() {
        // Underused lanes, but the faster codec moves fewer pages (a guest-bound case).
        let rate = |c| match c {
            Codec::Zstd => 50e3,
            _ => 40e3,
        };
        let (codec, t) = drive(Codec::Zstd, 1e9, 20.0, rate);
        assert_eq!(codec, Codec::Zstd);
        let trials = t.finish().1;
        assert!(trials.iter().all(|t| !t.kept && t.to == Codec::Lz4));
        // Windows of 0.4 s: waits of 2, 4, 8, 16 windows leave room for about 5 trials in 20
        // s, not one every other window.
        assert!((3..=6).contains(&trials.len()), "{trials:?}");
        let gaps: Vec<f64> = trials.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
        assert!(gaps.windows(2).all(|g| g[1] > g[0]), "waits grow: {gaps:?}");
    }

    #[test]
    fn a_faster_codec_the_lanes_would_cap_is_not_tried() {
        // The guest leaves the workers 60k zstd pages/s: 96 MB/s on 120 MB/s lanes, 80%
        // full. LZ4 would be faster on the cores, but at 2000 bytes a page the lanes carry
        // only 60k of its pages a second: no gain, so no trial (which would only send more
        // bytes for a window).
        let lane = 120e6;
        let rate = |c| match c {
            Codec::Zstd => 60e3,
            c => lane / bpp(c),
        };
        let (codec, t) = drive(Codec::Zstd, lane, 10.0, rate);
        assert_eq!(codec, Codec::Zstd);
        assert!(t.finish().1.is_empty());
    }

    #[test]
    fn a_trial_must_beat_the_best_window_that_called_for_it() {
        // Zstd moves 60k pages/s on underused lanes, but the second window of the streak
        // dips to 46k (the guest took a core). LZ4 moves 56k: more than the dip, less than
        // what zstd moves. It must not be kept.
        let rate = |c, t: f64| match c {
            Codec::Zstd if (0.4..0.7).contains(&t) => 46e3,
            Codec::Zstd => 60e3,
            _ => 56e3,
        };
        let t = tuner(Codec::Zstd, 1e9, [1e6; 3]);
        let (codec, t) = drive_tuner(t, 1.2, f64::INFINITY, rate);
        assert_eq!(codec, Codec::Zstd);
        let trials = t.finish().1;
        assert_eq!(trials.len(), 1, "{trials:?}");
        let trial = &trials[0];
        assert!(!trial.kept && trial.to == Codec::Lz4, "{trial:?}");
        assert!((trial.from_pages_per_s - 60e3).abs() < 1e3, "{trial:?}");
    }

    #[test]
    fn full_lanes_try_the_stronger_codec() {
        // LZ4 fills the lanes; zstd has the cores to fill them too, with fewer bytes a page.
        let lane = 125e6;
        let rate = |c| lane / bpp(c);
        let (codec, t) = drive(Codec::Lz4, lane, 3.0, rate);
        assert_eq!(codec, Codec::Zstd);
        assert!(t.finish().1[0].kept);
    }

    #[test]
    fn the_strongest_codec_on_full_lanes_stays() {
        let lane = 125e6;
        let (codec, t) = drive(Codec::Zstd, lane, 10.0, |c| lane / bpp(c));
        assert_eq!(codec, Codec::Zstd);
        assert!(t.finish().1.is_empty());
    }

    #[test]
    fn finishing_undoes_a_trial_in_progress() {
        // Zstd leaves the lanes half empty: LZ4 is being tried when the live phase ends.
        let rate = |c| if c == Codec::Zstd { 50e3 } else { 80e3 };
        let (now, t) = drive(Codec::Zstd, 1e9, 0.8, rate);
        assert_eq!(now, Codec::Lz4);
        assert_eq!(t.finish(), (Codec::Zstd, Vec::new()));
    }

    #[test]
    fn restart_drops_the_window_in_progress() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = Tuner::new(Codec::Zstd, 1e9, Codec::ALL.map(bpp), [1e6; 3], t0);
        assert_eq!(t.observe(at(100), 0, 0), None);
        assert_eq!(t.restart(at(200)), None);
        // Within the settling time nothing counts, and the next window starts after it.
        assert_eq!(t.observe(at(250), 1_000_000, 0), None);
        assert!(t.mark.is_none());
        assert_eq!(t.observe(at(300), 1_000_000, 0), None);
        assert_eq!(t.mark.map(|m| m.pages), Some(1_000_000));
    }

    #[test]
    fn a_second_harvest_undoes_a_trial_in_progress() {
        // As in `finishing_undoes_a_trial_in_progress`, LZ4 is on trial at 0.8 s.
        let rate = |c| if c == Codec::Zstd { 50e3 } else { 80e3 };
        let (now, mut t) = drive(Codec::Zstd, 1e9, 0.8, rate);
        assert_eq!(now, Codec::Lz4);
        let at = t.t0 + Duration::from_millis(900);
        // The first harvest only starts the trial's window again; the second undoes it.
        assert_eq!(t.restart(at), None);
        assert_eq!(t.codec, Codec::Lz4);
        assert_eq!(t.restart(at), Some(Codec::Zstd));
        assert_eq!(t.codec, Codec::Zstd);
        // Recorded as lost, unmeasured, and LZ4 waits before it is tried again.
        let trial = &t.trials[0];
        assert_eq!(
            (trial.to, trial.kept, trial.to_pages_per_s),
            (Codec::Lz4, false, 0.0)
        );
        assert_eq!(t.wait[index(Codec::Lz4)], 2);
        assert_eq!(t.restart(at), None);
    }

    #[test]
    fn a_stronger_codec_the_workers_would_cap_is_not_tried() {
        // LZ4 fills 125 MB/s lanes at 62k pages/s; the probe saw the workers encode 46k zstd
        // pages/s. Zstd cannot win: no trial.
        let lane = 125e6;
        let rate = |c, _| match c {
            Codec::Zstd => 40e3,
            c => lane / bpp(c),
        };
        let run = |zstd| {
            drive_tuner(
                tuner(Codec::Lz4, lane, [zstd, 70e3, 1e6]),
                10.0,
                f64::INFINITY,
                rate,
            )
        };
        let (codec, t) = run(46e3);
        assert_eq!(codec, Codec::Lz4);
        assert!(t.finish().1.is_empty());
        // Where the workers could encode 80k, the trial is made (and lost).
        let (codec, t) = run(80e3);
        assert_eq!(codec, Codec::Lz4);
        assert!(!t.finish().1.is_empty());
    }

    #[test]
    fn a_trial_a_harvest_cuts_is_measured_after_it() {
        // Timebound harvests every 1.03 s, and the tuner's first trial starts just before the
        // first harvest: zstd leaves the lanes half empty, LZ4 moves 30% more pages.
        let rate = |c, _| if c == Codec::Zstd { 50e3 } else { 65e3 };
        let t = tuner(Codec::Zstd, 1e9, [1e6; 3]);
        let (codec, t) = drive_tuner(t, 3.0, 1.03, rate);
        assert_eq!(codec, Codec::Lz4);
        let trials = t.finish().1;
        assert!(trials[0].kept && trials[0].to == Codec::Lz4, "{trials:?}");
    }
}
