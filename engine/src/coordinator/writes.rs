//! How many distinct pages the guest writes in a window of time: the model the forecasts use.
//!
//! A linear dirty rate over-forecasts a guest that rewrites a working set (it cannot dirty more
//! pages than it touches) and, measured only at harvests, knows nothing before the first one.
//! The executor instead fits, during its setup probe, a guest that writes a working set of `W`
//! pages at `r` new pages per second at first, plus a drift of `c` new pages per second over
//! all `M` pages of memory:
//!
//! ```text
//! distinct(τ) = W (1 − e^(−r τ / W)) + min(c τ, M)
//! ```
//!
//! The drift is what the probe saw grow linearly, without falling off: a sweep over memory
//! (`dirty-all`, a sequential writer, a large copy) looks so. It is taken at its word, new pages
//! until memory is covered. Writes spread at random over all of memory would fall off (as
//! `M (1 − e^(−c τ / M))`), but a probe that saw no falloff has no evidence of that, and that
//! form counts a sweep at 63% of memory when it has covered all of it: the stop-and-copy of a
//! sweeping guest was forecast at half its size.
//!
//! Three equal windows from the same start give three increments `d1, d2, d3`; with
//! `x = e^(−r h / W)`, `d_i = W (1 − x) x^(i−1) + c h` (the drift is linear over so short a
//! probe), so `x = (d2 − d3) / (d1 − d2)`, `W (1 − x)² = d1 − d2` and `c h = d1 − W (1 − x)`.
//!
//! A probe of a few hundred milliseconds cannot tell everything apart: a sweep over half of
//! memory, with a period longer than the probe, looks like a sweep over all of it, and a
//! working set written in two tiers (hot and cold) fits with the wrong size. So the executor
//! keeps reading the dirty log while the migration runs, and passes what it has seen: the
//! [`Touched`] pages, every page written at least once since the probe began, and how fast that
//! set grows. No window can write more distinct pages than those and the growth to come: that
//! ceiling caps the model wherever it extrapolates past what the guest has done.

/// Distinct pages written in a window of τ seconds (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteModel {
    /// New pages of the working set per second at the start of a window.
    pub rate: f64,
    /// The working set, in pages.
    pub wss: f64,
    /// New pages per second written outside the working set, until `memory` is covered.
    pub drift: f64,
    /// Pages the drift covers (all of memory).
    pub memory: f64,
    /// What the dirty log has shown since the probe, if the executor kept reading it: a ceiling
    /// on the pages any window writes.
    pub touched: Option<Touched>,
}

/// The pages the guest has written at least once since the probe began, as the dirty log
/// showed them, and how fast that set grew lately.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Touched {
    /// Pages written at least once.
    pub pages: f64,
    /// Pages per second the set grew by, over the last fraction of a second.
    pub rate: f64,
}

impl Touched {
    /// The most distinct pages a window of `secs` seconds can write: the pages touched so far
    /// and those the growth adds meanwhile.
    fn ceiling(&self, secs: f64) -> f64 {
        self.pages.max(0.0) + self.rate.max(0.0) * secs.max(0.0)
    }
}

/// Increments that fall off more slowly than this per window are steady writing.
const LINEAR: f64 = 0.9;

/// Over how long [`TouchedGrowth`] measures the touched set's growth.
const GROWTH_WINDOW: f64 = 0.5;

/// Follows the count of touched pages through time, for [`Touched`].
#[derive(Debug, Clone, Default)]
pub struct TouchedGrowth {
    /// `(seconds, pages touched)`, oldest first: the last [`GROWTH_WINDOW`] and one before.
    marks: std::collections::VecDeque<(f64, f64)>,
}

impl TouchedGrowth {
    /// Notes `pages` touched at `secs` (any fixed origin, not decreasing).
    pub fn mark(&mut self, secs: f64, pages: f64) {
        self.marks.push_back((secs, pages));
        while self.marks.len() > 2 && secs - self.marks[1].0 >= GROWTH_WINDOW {
            self.marks.pop_front();
        }
    }

    /// The touched pages at the last mark and their growth over the window; `None` before two
    /// marks.
    pub fn touched(&self) -> Option<Touched> {
        let (&(t0, p0), &(t1, p1)) = (self.marks.front()?, self.marks.back()?);
        (t1 > t0).then(|| Touched {
            pages: p1,
            rate: ((p1 - p0) / (t1 - t0)).max(0.0),
        })
    }
}

impl WriteModel {
    /// Distinct pages written in `secs` seconds.
    pub fn distinct(&self, secs: f64) -> f64 {
        (saturating(self.rate, self.wss, secs) + sweep(self.drift, self.memory, secs))
            .min(self.ceiling(secs))
    }

    /// The ceiling the touched pages put on a window that ends `secs` seconds from now
    /// (infinite if unknown).
    pub(super) fn ceiling(&self, secs: f64) -> f64 {
        self.touched.map_or(f64::INFINITY, |t| t.ceiling(secs))
    }

    /// The working set's size, at most the pages touched so far.
    pub fn working_set(&self) -> f64 {
        self.touched
            .map_or(self.wss, |t| self.wss.min(t.pages.max(0.0)))
    }

    /// How often the drift writes each page it covers, per second: its rate over all of
    /// memory, or over the touched pages beyond the working set when the dirty log showed
    /// fewer.
    pub fn drift_page_rate(&self) -> f64 {
        let covered = self.touched.map_or(self.memory, |t| {
            self.memory.min(t.pages - self.working_set())
        });
        if self.drift > 0.0 && covered >= 1.0 {
            self.drift / covered
        } else {
            0.0
        }
    }

    /// The same guest running `speed` times as fast (the touched pages' growth was measured at
    /// the speed the guest runs now, and stays).
    pub fn scaled(&self, speed: f64) -> Self {
        Self {
            rate: self.rate * speed,
            drift: self.drift * speed,
            ..*self
        }
    }

    /// Of the pages written in the `secs` seconds before a switchover, those dirty then: pages
    /// written after they were sent. The working set's pages sent before the window count
    /// when written in it; the share `resent` of them sent again at an even pace within it (a
    /// pre-copy pass over the dirty set) only when written after that. The drift counts on
    /// each share of memory for the time from its send to the switchover: `(share, seconds)`
    /// pairs that add up to all of memory.
    ///
    /// Returns the working set's part and the drift's, apart: the working set's pages are
    /// mostly dirty already when a harvest has seen the guest, the drift's mostly new. Both
    /// within the touched pages' ceiling at the window's end, `ahead` seconds from now (the
    /// touched pages hold what came before), the drift first cut.
    pub fn dirtied(&self, secs: f64, ahead: f64, shares: &[(f64, f64)], resent: f64) -> Writes {
        let ceiling = self.ceiling(ahead);
        let written = saturating(self.rate, self.wss, secs);
        // A page sent at a uniform time within the window is rewritten after it with the
        // chance 1 − (1 − e^(−x)) / x, x = rate × secs ÷ wss: the working set less the
        // window's writes ÷ x.
        let x = if self.wss > 0.0 {
            self.rate * secs / self.wss
        } else {
            0.0
        };
        let after_resend = if x > 1e-9 {
            (self.wss - written / x).max(0.0)
        } else {
            0.0
        };
        let resent = resent.clamp(0.0, 1.0);
        let working_set = ((1.0 - resent) * written + resent * after_resend).min(ceiling);
        let drift = shares
            .iter()
            .map(|&(share, t)| share.clamp(0.0, 1.0) * sweep(self.drift, self.memory, t))
            .sum::<f64>();
        Writes {
            working_set,
            drift: drift.min(ceiling - working_set),
            ceiling,
        }
    }

    /// Fits the model to the distinct pages written in the first `h`, `2h` and `3h` seconds of
    /// a window (`u1 ≤ u2 ≤ u3`), in a memory of `memory` pages. Increments that do not fall
    /// off (no working set seen) give a drift alone, at the rate of the last window.
    pub fn fit(h: f64, u: [f64; 3], memory: f64) -> Self {
        let u2 = u[1].max(u[0]);
        let u3 = u[2].max(u2);
        let (d1, d2, d3) = (u[0].max(0.0), u2 - u[0].max(0.0), u3 - u2);
        let drift_only = |rate: f64| Self {
            rate: 0.0,
            wss: 0.0,
            drift: rate.max(0.0),
            memory,
            touched: None,
        };
        if h <= 0.0 {
            return drift_only(0.0);
        }
        if d1 <= d2 || d2 < d3 {
            // Not falling off: no working set to saturate, or noise.
            return drift_only(d3.max(d1) / h);
        }
        // x in [0, 1): d2 = d3 means the working set was saturated within the first window.
        let x = ((d2 - d3) / (d1 - d2)).max(0.0);
        let wss = (d1 - d2) / ((1.0 - x) * (1.0 - x));
        if x > LINEAR || wss > memory {
            // Barely falling off, or a working set larger than memory: noise on steady
            // writing, not a working set.
            return drift_only(u3 / (3.0 * h));
        }
        let drift = ((d1 - wss * (1.0 - x)) / h).max(0.0);
        // A working set saturated within the first window has an unknown, high rate: take the
        // one that fills 99% of it in that window.
        let x = x.max(0.01);
        Self {
            rate: -wss * x.ln() / h,
            wss,
            drift,
            memory,
            touched: None,
        }
    }
}

/// Pages dirtied in a window, as [`WriteModel::dirtied`] forecasts them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Writes {
    /// Within the working set: pages the guest rewrites, dirty again and again.
    pub working_set: f64,
    /// Outside it: pages new to the window.
    pub drift: f64,
    /// The most pages the guest can have written by the window's end (touched pages and
    /// their growth); infinite if unknown.
    pub ceiling: f64,
}

impl Default for Writes {
    fn default() -> Self {
        Self {
            working_set: 0.0,
            drift: 0.0,
            ceiling: f64::INFINITY,
        }
    }
}

impl Writes {
    /// Both parts.
    pub fn total(&self) -> f64 {
        self.working_set + self.drift
    }

    /// The pages dirty at the end of the window, of `memory` pages, when `dirty` were dirty
    /// before it: the working set's writes fall on those (the larger of the two counts), the
    /// drift's on any page, clean ones as likely as the others; no more than the ceiling, as
    /// the dirty pages were written too.
    pub fn over(&self, dirty: f64, memory: f64) -> f64 {
        let before = dirty.max(self.working_set).clamp(0.0, memory.max(0.0));
        let clean = if memory > 0.0 {
            1.0 - before / memory
        } else {
            0.0
        };
        (before + self.drift.max(0.0) * clean).min(self.ceiling.max(dirty))
    }

    /// The pages written in the window or seen written before it, `seen` of `memory` pages:
    /// the working set's writes fall evenly on its `working_set` pages, as many of them seen
    /// as can be; the drift's on any page. No more than the ceiling.
    pub fn with_seen(&self, seen: f64, working_set: f64, memory: f64) -> f64 {
        let unseen = |set: f64| {
            if set > 0.0 {
                1.0 - (seen / set).clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        let new =
            self.working_set.max(0.0) * unseen(working_set) + self.drift.max(0.0) * unseen(memory);
        (seen + new).min(self.ceiling.max(seen))
    }
}

/// Distinct pages among `set` written in `secs` seconds by a sweep of `rate` new pages per
/// second.
fn sweep(rate: f64, set: f64, secs: f64) -> f64 {
    if rate <= 0.0 || set <= 0.0 || secs <= 0.0 {
        0.0
    } else {
        (rate * secs).min(set)
    }
}

/// Distinct pages among `set` written in `secs` seconds at first `rate` pages per second, each
/// write on a page chosen evenly.
fn saturating(rate: f64, set: f64, secs: f64) -> f64 {
    if rate <= 0.0 || set <= 0.0 || secs <= 0.0 {
        0.0
    } else if set.is_infinite() {
        rate * secs
    } else {
        -set * (-rate * secs / set).exp_m1()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MEM: f64 = 1e6;

    /// Writes added to pages seen written: the working set's fall on its unseen pages only,
    /// the drift's on any page, and the ceiling holds.
    #[test]
    fn writes_with_seen_pages() {
        let w = Writes {
            working_set: 100.0,
            drift: 50.0,
            ceiling: f64::INFINITY,
        };
        // 250 of a 1000-page working set seen: 75 new in it, 50 × (1 − 250/10 000) drifting.
        assert!((w.with_seen(250.0, 1000.0, 10_000.0) - (250.0 + 75.0 + 48.75)).abs() < 1e-9);
        // Nothing seen: all of it.
        assert_eq!(w.with_seen(0.0, 1000.0, 10_000.0), 150.0);
        // The whole working set seen: the drift only.
        assert!((w.with_seen(1000.0, 1000.0, 10_000.0) - 1045.0).abs() < 1e-9);
        let capped = Writes {
            ceiling: 300.0,
            ..w
        };
        assert_eq!(capped.with_seen(250.0, 1000.0, 10_000.0), 300.0);
        assert_eq!(capped.with_seen(400.0, 1000.0, 10_000.0), 400.0);
    }

    #[test]
    fn steady_writing_is_a_drift() {
        let m = WriteModel::fit(0.1, [1000.0, 2000.0, 3000.0], MEM);
        assert_eq!(m.wss, 0.0);
        assert!((m.drift - 10_000.0).abs() < 1e-6);
        assert!((m.distinct(1.0) - 10_000.0).abs() < 1e-6);
        // A sweep covers memory once, and no more.
        assert!((m.distinct(100.0) - MEM).abs() < 1e-6);
        assert!((m.distinct(200.0) - MEM).abs() < 1e-6);
    }

    #[test]
    fn noise_on_steady_writing_is_a_drift() {
        let m = WriteModel::fit(0.1, [17_000.0, 33_900.0, 50_700.0], MEM);
        assert_eq!(m.wss, 0.0);
        assert!((m.drift - 169_000.0).abs() < 1.0, "{m:?}");
    }

    /// A working-set page resent at a uniform time within the window is dirty at its end only
    /// if rewritten after: 1 − (1 − e^(−x)) / x of them, against 1 − e^(−x) sent before it.
    #[test]
    fn a_resent_working_set_counts_only_what_is_written_after_the_resend() {
        let m = WriteModel {
            rate: 1000.0,
            wss: 1000.0,
            drift: 0.0,
            memory: MEM,
            touched: None,
        };
        let e = (-1.0f64).exp();
        let before = 1000.0 * (1.0 - e);
        let after = 1000.0 * e;
        let ws = |resent| m.dirtied(1.0, 1.0, &[(1.0, 1.0)], resent).working_set;
        assert!((ws(0.0) - before).abs() < 1e-6, "{}", ws(0.0));
        assert!((ws(1.0) - after).abs() < 1e-6, "{}", ws(1.0));
        assert!((ws(0.5) - (before + after) / 2.0).abs() < 1e-6);
        // Short windows: on average half the window is left after a resend.
        let short = m.dirtied(1e-3, 1e-3, &[(1.0, 1e-3)], 1.0).working_set;
        assert!((short - 0.5).abs() < 1e-3, "{short}");
    }

    #[test]
    fn drift_lands_on_clean_pages_and_the_working_set_on_dirty_ones() {
        let w = Writes {
            working_set: 300.0,
            drift: 400.0,
            ..Writes::default()
        };
        // 500 of 1000 pages dirty: the working set's 300 are among them; half the drift's
        // pages are clean.
        assert!((w.over(500.0, 1000.0) - 700.0).abs() < 1e-9);
        // A working set larger than the dirty set counts in full.
        assert!((w.over(100.0, 1000.0) - (300.0 + 400.0 * 0.7)).abs() < 1e-9);
        // Never more than memory.
        assert!(w.over(1000.0, 1000.0) <= 1000.0);
        assert_eq!(Writes::default().over(42.0, 1000.0), 42.0);
    }

    #[test]
    fn touched_growth_follows_the_last_half_second() {
        let mut g = TouchedGrowth::default();
        g.mark(0.0, 0.0);
        assert_eq!(g.touched(), None);
        // 1000 pages a second for a second, then nothing.
        for k in 1..=10 {
            g.mark(0.1 * k as f64, 100.0 * k as f64);
        }
        let t = g.touched().unwrap();
        assert!(
            (t.pages - 1000.0).abs() < 1e-9 && (t.rate - 1000.0).abs() < 1e-6,
            "{t:?}"
        );
        for k in 11..=14 {
            g.mark(0.1 * k as f64, 1000.0);
        }
        // The window still holds growth.
        assert!(g.touched().unwrap().rate > 0.0);
        g.mark(1.5, 1000.0);
        assert_eq!(g.touched().unwrap().rate, 0.0);
    }

    #[test]
    fn touched_pages_cap_windows_and_the_drift() {
        let m = WriteModel {
            rate: 1000.0,
            wss: 500.0,
            drift: 100.0,
            memory: MEM,
            touched: Some(Touched {
                pages: 800.0,
                rate: 10.0,
            }),
        };
        // 500 + 1000 without the ceiling; 800 + 10 × 10 with it.
        assert!((m.distinct(10.0) - 900.0).abs() < 1e-9);
        let w = m.dirtied(10.0, 10.0, &[(1.0, 10.0)], 0.0);
        // Only the window's future grows the ceiling: the touched pages hold its past.
        let late = m.dirtied(11.0, 1.0, &[(1.0, 11.0)], 0.0);
        assert!((late.total() - 810.0).abs() < 1e-6, "{late:?}");
        assert!((w.total() - 900.0).abs() < 1e-6, "{w:?}");
        assert!(w.over(0.0, MEM) <= 900.0 + 1e-9);
        // Dirty pages were written: never fewer than those.
        assert_eq!(w.over(950.0, MEM), 950.0);
        // The drift goes round the 300 touched pages beyond the working set.
        assert!((m.drift_page_rate() - 100.0 / 300.0).abs() < 1e-12);
        let blind = WriteModel { touched: None, ..m };
        assert!((blind.drift_page_rate() - 100.0 / MEM).abs() < 1e-12);
    }

    #[test]
    fn a_quiet_guest_writes_nothing() {
        let m = WriteModel::fit(0.1, [0.0; 3], MEM);
        assert_eq!(m.distinct(10.0), 0.0);
    }

    #[test]
    fn a_working_set_saturated_in_the_first_window_is_its_size() {
        let m = WriteModel::fit(0.1, [5000.0, 5000.0, 5000.0], MEM);
        assert!((m.wss - 5000.0).abs() < 1e-6 && m.drift == 0.0, "{m:?}");
        assert!(m.distinct(10.0) <= 5000.0 && m.distinct(10.0) > 4999.0);
    }

    proptest! {
        /// Fitting three windows of a known model gives the model back.
        #[test]
        fn fit_recovers_the_model(
            rate in 1e3f64..1e6,
            wss in 1e3f64..2e5,
            drift in 0f64..1e4,
            h in 0.05f64..0.5,
        ) {
            let truth = WriteModel { rate, wss, drift, memory: MEM, touched: None };
            // Windows that tell the shape apart: the working set neither saturated in the
            // first window nor still linear, and the drift linear over the probe.
            let x = (-rate * h / wss).exp();
            prop_assume!((0.02..0.9).contains(&x));
            let lin = WriteModel { memory: f64::INFINITY, ..truth };
            let m = WriteModel::fit(h, [1.0, 2.0, 3.0].map(|k| lin.distinct(k * h)), MEM);
            prop_assert!((m.wss / wss - 1.0).abs() < 1e-6, "{m:?}");
            prop_assert!((m.rate / rate - 1.0).abs() < 1e-6, "{m:?}");
            prop_assert!((m.drift - drift).abs() < 1e-3 * rate, "{m:?}");
        }

        /// A guest running `s` times as fast writes in `t` what it wrote in `s × t`.
        #[test]
        fn scaling_is_time(
            rate in 1f64..1e6,
            wss in 1f64..1e6,
            drift in 0f64..1e5,
            s in 0.05f64..4.0,
            t in 0f64..10.0,
        ) {
            let m = WriteModel { rate, wss, drift, memory: MEM, touched: None };
            let (a, b) = (m.scaled(s).distinct(t), m.distinct(s * t));
            prop_assert!((a - b).abs() <= 1e-9 * b.max(1.0), "{a} vs {b}");
        }

        /// More time never means fewer distinct pages, nor more than the working set and the
        /// memory hold.
        #[test]
        fn distinct_is_monotone_and_bounded(
            u1 in 0f64..1e5,
            more in 0f64..1e5,
            most in 0f64..1e5,
            t in 0f64..100.0,
            dt in 0f64..100.0,
        ) {
            let m = WriteModel::fit(0.1, [u1, u1 + more, u1 + more + most], MEM);
            prop_assert!(m.distinct(t) <= m.distinct(t + dt) + 1e-9);
            prop_assert!(m.distinct(t + dt) <= m.wss + MEM + 1e-6);
        }
    }
}
