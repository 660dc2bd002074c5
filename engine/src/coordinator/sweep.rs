//! Where a sweeping guest's next writes fall, page by page.
//!
//! A guest that sweeps memory (`dirty-all`, an MG-like solver) writes each page it covers once
//! per period. Whether a page sent now is dirty at the switchover then depends on where the
//! sweep stands against the sends, not on how fast the guest writes on average: on the
//! simulator, the mean model ([`super::WriteModel`]) forecast the stop-and-copy of such a
//! guest anywhere from half to twice its size at 25% progress, depending on where the sweep
//! started. The dirty log shows where it stands. Read after read, a [`WriteClock`] notes in
//! what order a sample of the pages was first seen written, and which pages each read showed.
//!
//! - **The sweep's order.** The probe clears the whole log before it starts, so the first lap
//!   after it shows every write: the order in which pages were first seen written is the
//!   order the sweep writes them in, lap after lap. Pages not seen yet (the first lap is not
//!   over) come after the others, in page order from where the sweep stands.
//! - **Where it stands.** The pages the latest read showed are where the sweep was then (the
//!   densest run of them: a few pages the guest rewrites all the time show wherever they were
//!   sent); it has moved on since at its current speed.
//! - **How fast it moves.** Where it stood read after read: the first page of each run was
//!   the first written after the read before. The write model's speed (the probe's, scaled by
//!   the vCPUs' CPU time) was half the sweep's on the testbed late in a migration. It is taken
//!   in the first lap only (see [`super::sweep`]).
//! - **One sweep a vCPU.** A guest whose vCPUs each sweep their own share of memory (the
//!   testbed's `dirty-all` and `seq`) has as many sweeps, at speeds of their own: in one
//!   order they stand at several places, and a read's densest run is one or the other. The
//!   clock also follows each share of the pages (one a vCPU, in page order) on its own, and
//!   when most reads show sweeps in two shares or more at once, the forecast takes each
//!   share's order, place and speed ([`SweepOrder::parts`]). One sweep over all of memory
//!   shows in one share at a time, and keeps the one order.
//!
//! A page `d` pages ahead of the sweep in its order is written again `d ÷ speed` seconds from
//! now, and every period after that ([`SweepOrder`]). Dating each page by its last write
//! instead (written again a period after it) went wrong on the testbed: before the migration
//! the guest ran two to three times faster, so its pages were due much sooner than their
//! dates said; and the log shows one write per page between two re-arms (the send of the
//! page), so a never-sent page's date stays at its first write, laps old.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// At most this many pages are followed; a larger guest is sampled evenly.
pub const SAMPLES: u64 = 1 << 16;

/// Follows, read after read of the dirty log, in what order the sampled pages were first seen
/// written, where the sweep stood at the latest read that showed writes, and how fast it moves.
#[derive(Debug, Clone)]
pub struct WriteClock {
    /// Every `stride`-th page is followed.
    stride: u64,
    pages: u64,
    /// Per sampled page: its place in the order of first writes; NaN if never seen written.
    place: Vec<f32>,
    /// Sampled pages seen written, and when that last grew.
    seen: usize,
    grew: f32,
    /// Per sampled page: its bit in the previous read.
    was_set: Vec<bool>,
    /// The previous read, and the last one that showed writes with the read before it.
    prev_read: f32,
    latest: (f32, f32),
    /// The first and last places of the sweep's run at the latest read that showed writes.
    run: (f32, f32),
    /// Where the sweep stood at the reads before those in a row that showed it, over the last
    /// [`SPEED_WINDOW`]: `(seconds of the read before, first place of the run)`.
    heads: VecDeque<(f32, f32)>,
    /// When the guest's speed last changed ([`WriteClock::speed_changes`]).
    speed_from: f32,
    /// Sampled pages the latest read that showed writes showed, and how close together they
    /// lie ([`density`]).
    shown: usize,
    dense: f32,
    /// A clock over each share of the sample (a vCPU's share of memory, in page order), each
    /// following a sweep of its own; none with one share. Local page `j` of a share is its
    /// `j`-th sample.
    shares: Vec<WriteClock>,
    /// Of the last [`APART_READS`] reads that showed writes, whether each showed a sweep in
    /// two shares or more.
    together: VecDeque<bool>,
    /// Whether the shares' sweeps are followed each on its own: most of those reads showed
    /// several at once. It stays so.
    apart: bool,
    /// Of the last [`SCATTER_READS`] reads that showed at least [`SHARE_RUN_MIN`] pages written
    /// again (seen before), whether each spread them over most of the order: a guest writing
    /// at random within a set of pages does; a sweep, or one a vCPU, writes them in a few
    /// runs of its order.
    scatter: VecDeque<bool>,
}

/// Over how many reads, and in how many parts of the order, [`WriteClock`] tells a sweep from
/// writes at random: the pages a read shows written again fall in more than half the parts
/// in most of those reads (at least [`SCATTER_READS`] / 2 of them).
const SCATTER_READS: usize = 8;
const SCATTER_PARTS: usize = 16;

/// The shares' sweeps are taken apart when at least half of this many reads in a row showed
/// writes in two shares or more (a sweep over all of memory shows in one share at a time).
const APART_READS: usize = 8;

/// A share's pages in a read show a sweep of its own when they are at least this many samples
/// (the pages a guest rewrites all the time are a few) and at least this share of the pages
/// they span (a guest writing at random spreads them over the share).
const SHARE_RUN_MIN: usize = 16;
const SHARE_RUN_DENSE: f32 = 0.25;

/// A sweep whose reads have shown no page it had not seen for this long has come round
/// ([`WriteClock::covered`]): three reads of the log in the live phase. Sooner, from the
/// next read on, when at its speed it would have shown [`COVERED_MISSED`] pages or more.
const COVERED_AFTER: f32 = 0.3;
const COVERED_READ: f32 = 0.08;
const COVERED_MISSED: f32 = 512.0;

/// The share of a read's pages in a share that its density is taken over ([`density`]).
const DENSE_SHARE: f32 = 0.75;

/// Over how long [`WriteClock`] measures the sweep's speed, and in how many steps from one
/// read to the next at least.
const SPEED_WINDOW: f32 = 0.5;
const SPEED_STEPS: usize = 3;

/// Where a page stands in a migration, for [`WriteClock::snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not sent yet.
    NeverSent,
    /// Sent, and not written since.
    Clean,
    /// Sent and written since (in a dirty group, or not harvested yet).
    Dirty,
    /// Not guest memory (a hole between regions).
    Absent,
}

impl WriteClock {
    /// A clock over `pages` pages (page numbers `0..pages`), nothing seen yet, that follows
    /// one sweep.
    pub fn new(pages: u64) -> Self {
        Self::with_shares(pages, 1)
    }

    /// A clock over `pages` pages that also follows a sweep in each of `shares` equal parts of
    /// them, should the reads show several at once (a guest whose vCPUs each sweep their own
    /// share of memory, at speeds of their own).
    pub fn with_shares(pages: u64, shares: usize) -> Self {
        let mut c = Self::sampled(pages);
        let n = c.place.len();
        if shares > 1 {
            c.shares = (0..shares)
                .map(|r| Self::sampled(((r + 1) * n / shares - r * n / shares) as u64))
                .collect();
        }
        c
    }

    fn sampled(pages: u64) -> Self {
        let stride = pages.div_ceil(SAMPLES).max(1);
        let n = pages.div_ceil(stride) as usize;
        Self {
            stride,
            pages,
            place: vec![f32::NAN; n],
            seen: 0,
            grew: f32::NAN,
            was_set: vec![false; n],
            prev_read: f32::NAN,
            latest: (f32::NAN, f32::NAN),
            run: (f32::NAN, f32::NAN),
            heads: VecDeque::new(),
            speed_from: f32::NEG_INFINITY,
            shown: 0,
            dense: 0.0,
            shares: Vec::new(),
            together: VecDeque::new(),
            apart: false,
            scatter: VecDeque::new(),
        }
    }

    /// Notes a read of the log at `secs`: a sampled page whose bit `is_set` now and was clear
    /// at the previous read was written in between. The pages first seen go after those seen
    /// before, in page order from the page after the widest gap between them (a sweep that
    /// came round to the first pages within the read comes round last).
    pub fn read(&mut self, secs: f64, is_set: impl Fn(u64) -> bool) {
        let bits: Vec<bool> = (0..self.place.len())
            .map(|i| is_set(i as u64 * self.stride))
            .collect();
        self.read_bits(secs, &bits);
    }

    /// [`WriteClock::read`] of the sampled pages' bits.
    fn read_bits(&mut self, secs: f64, bits: &[bool]) {
        let at = secs as f32;
        if !self.shares.is_empty() {
            let mut from = 0;
            let mut showing = 0;
            for c in &mut self.shares {
                let to = from + c.place.len();
                c.read_bits(secs, &bits[from..to]);
                if c.latest.1 == at && c.shown >= SHARE_RUN_MIN && c.dense >= SHARE_RUN_DENSE {
                    showing += 1;
                }
                from = to;
            }
            if showing > 0 {
                self.together.push_back(showing > 1);
                if self.together.len() > APART_READS {
                    self.together.pop_front();
                }
                let n = self.together.iter().filter(|&&t| t).count();
                self.apart |= 2 * n >= APART_READS;
            }
        }
        let (mut shown, mut new, mut again) = (Vec::new(), Vec::new(), Vec::new());
        for (i, was) in self.was_set.iter_mut().enumerate() {
            let now = bits[i];
            if now && !*was {
                if self.place[i].is_nan() {
                    new.push(i);
                } else {
                    again.push(self.place[i]);
                }
                shown.push(i);
            }
            *was = now;
        }
        if again.len() >= SHARE_RUN_MIN {
            let mut parts = [false; SCATTER_PARTS];
            for x in again {
                let k = (x / self.seen as f32 * SCATTER_PARTS as f32) as usize;
                parts[k.min(SCATTER_PARTS - 1)] = true;
            }
            let spread = 2 * parts.iter().filter(|&&b| b).count() > SCATTER_PARTS;
            self.scatter.push_back(spread);
            if self.scatter.len() > SCATTER_READS {
                self.scatter.pop_front();
            }
        }
        let before = std::mem::replace(&mut self.prev_read, at);
        let n = self.place.len();
        let gap = |k: usize| new.get(k + 1).map_or(new[0] + n, |&i| i) - new[k];
        if let Some(widest) = (0..new.len()).max_by_key(|&k| gap(k)) {
            let len = new.len();
            new.rotate_left((widest + 1) % len);
        }
        if !new.is_empty() {
            self.grew = at;
        }
        for i in new {
            self.place[i] = self.seen as f32;
            self.seen += 1;
        }
        if shown.is_empty() {
            return;
        }
        // Whether the read before showed writes too (for the speed, below).
        let in_a_row = self.latest.1 == before;
        self.latest = (before, at);
        self.shown = shown.len();
        self.dense = density(&shown, n);
        let mut places: Vec<f32> = shown.into_iter().map(|i| self.place[i]).collect();
        let lap = self.seen as f32;
        self.run = sweep_run(&mut places, lap);
        // The sweep's speed from reads in a row that showed it: the first page of its run was
        // the first written after the read before, where the sweep stood then. Reads that
        // show nothing (the sweep crossing pages not re-armed since it last wrote them) leave
        // gaps it may go round in.
        if !in_a_row {
            self.heads.clear();
        }
        if before >= self.speed_from {
            self.heads.push_back((before, self.run.0 % lap));
        }
        while let (Some(f), Some(b)) = (self.heads.front(), self.heads.back()) {
            if b.0 - f.0 <= SPEED_WINDOW {
                break;
            }
            self.heads.pop_front();
        }
    }

    /// The guest's speed changes at `secs` (the migration starts and takes cores from it):
    /// the sweep's speed is measured anew from there.
    pub fn speed_changes(&mut self, secs: f64) {
        self.heads.clear();
        self.speed_from = secs as f32;
        for c in &mut self.shares {
            c.speed_changes(secs);
        }
    }

    /// Sampled places per second the sweep moved on by over the last [`SPEED_WINDOW`], read
    /// after read: the median of the steps (forward less than half a lap, else back), from
    /// [`SPEED_STEPS`] on; else 0. A step falls short when the sends re-arm pages right behind
    /// the sweep (the log never shows those written), long when a read's run is found
    /// elsewhere; the upper quartile let the long ones through on the testbed.
    fn speed(&self) -> f64 {
        let lap = self.seen as f32;
        let mut rates: Vec<f64> = (1..self.heads.len())
            .map(|k| {
                let ((t0, p0), (t1, p1)) = (self.heads[k - 1], self.heads[k]);
                let d = (p1 - p0).rem_euclid(lap);
                let d = if d > 0.5 * lap { d - lap } else { d };
                f64::from(d) / f64::from(t1 - t0).max(1e-3)
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        if rates.len() < SPEED_STEPS {
            return 0.0;
        }
        rates[rates.len() / 2].max(0.0)
    }

    /// The sampled pages' places in the sweep's order and where the sweep stood at `secs`, by
    /// state, the never-sent ones in the order they go out: ascending from page `cursor`, then
    /// from the start. `taken` is the time of the read in the migration's clock
    /// ([`super::Progress::elapsed`]).
    pub fn snapshot(
        &self,
        secs: f64,
        taken: Duration,
        cursor: u64,
        state: impl Fn(u64) -> PageState,
    ) -> SweepOrder {
        let mut out = SweepOrder {
            stride: self.stride as f64,
            taken,
            ..SweepOrder::default()
        };
        out.whole = self.part(secs);
        // Several sweeps in one order would read as one that went round.
        out.whole.extent = self
            .covered(secs)
            .or_else(|| self.shares.is_empty().then(|| self.extent()).flatten());
        out.scattered = 2 * self.scatter.iter().filter(|&&b| b).count() >= SCATTER_READS;
        // Apart, each page stands in its share's order (the shares, in page order, make up
        // the sample).
        let places: Vec<(f32, u16)> = if self.apart {
            let mut places = Vec::with_capacity(self.place.len());
            for (r, c) in self.shares.iter().enumerate() {
                let mut part = c.part(secs);
                part.extent = c.covered(secs).or_else(|| c.extent());
                places.extend(c.places(&part).into_iter().map(|x| (x, r as u16)));
                out.parts.push(part);
            }
            places
        } else {
            let place = self.places(&out.whole);
            place.into_iter().map(|x| (x, 0)).collect()
        };
        let first = cursor.min(self.pages).div_ceil(self.stride) as usize;
        for i in (first..places.len()).chain(0..first) {
            let page = i as u64 * self.stride;
            match state(page) {
                PageState::NeverSent => out.never_sent.push(places[i]),
                PageState::Clean => out.clean.push(places[i]),
                PageState::Dirty => out.dirty.push(places[i]),
                PageState::Absent => {}
            }
        }
        out
    }

    /// Where this clock's sweep stood at the latest read that showed writes, seen from `secs`.
    fn part(&self, secs: f64) -> Part {
        let mut out = Part {
            seen: self.seen,
            samples: self.place.len(),
            speed: self.speed(),
            ..Part::default()
        };
        let (before, latest) = self.latest;
        if latest.is_finite() {
            let (first, last) = self.run;
            out.head = Head {
                first,
                last,
                span: if before.is_finite() {
                    latest - before
                } else {
                    0.0
                },
                age: (secs as f32 - latest).max(0.0),
            };
        }
        out
    }

    /// The sampled pages the sweep covers once it has come round, seen from `secs`: those seen
    /// written, when no read has shown a page not seen before for [`COVERED_AFTER`] (the sweep
    /// writes pages it wrote already), or for a read when the sweep moves fast enough that it
    /// would have shown [`COVERED_MISSED`] new pages meanwhile. The log may show nothing of the
    /// lap it is on: its pages not sent since its last lap were not re-armed, and membound
    /// holds back (does not send, so does not re-arm) the pages its first lap wrote ahead of
    /// the never-sent ones. `None` before.
    fn covered(&self, secs: f64) -> Option<usize> {
        let quiet = secs as f32 - self.grew;
        let missed = self.speed() as f32 * quiet;
        let round = quiet >= COVERED_AFTER || (quiet >= COVERED_READ && missed >= COVERED_MISSED);
        (self.seen > 0 && round).then_some(self.seen)
    }

    /// The sampled pages a sweep in address order covers, once it has gone round before
    /// covering them all: the pages it wrote since the probe are then two runs in page order,
    /// from where it stood to the end of what it covers and from the start of that on, with
    /// the pages it has not come to yet between them, and it stands in a run below the last.
    /// From the first run's start to the last one's end; `None` until then. Runs shorter than
    /// [`SHARE_RUN_MIN`] samples are the few pages a guest rewrites all the time; a page sent
    /// between its write and the next read leaves a hole in a run, and the sweep stands at
    /// the top of the last run then.
    fn extent(&self) -> Option<usize> {
        if self.seen == 0 || !self.latest.1.is_finite() {
            return None;
        }
        let at = self.page_at(self.run.1)?;
        let mut runs = Vec::new();
        let mut start = None;
        for (i, x) in self.place.iter().chain([&f32::NAN]).enumerate() {
            match (x.is_nan(), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    if i - s >= SHARE_RUN_MIN {
                        runs.push((s, i));
                    }
                    start = None;
                }
                _ => {}
            }
        }
        let (&(first, _), &(last, end)) = (runs.first()?, runs.last()?);
        // The sweep stands at the top of a run below the last: it goes on into the gap.
        let (_, top) = runs.iter().find(|&&(s, e)| (s..e).contains(&at))?;
        (at < last && top - at <= (end - first) / 16).then_some(end - first)
    }

    /// The sampled page at place `at` of the order (a lap on wraps), if one was seen there.
    fn page_at(&self, at: f32) -> Option<usize> {
        let at = (at.round() as usize % self.seen.max(1)) as f32;
        self.place.iter().position(|&x| x == at)
    }

    /// Every sampled page's place in the order of this clock's sweep (`part`, from
    /// [`WriteClock::part`]): the pages not seen written come after the others, in page order
    /// from where the sweep stands (as a sweep in address order does).
    fn places(&self, part: &Part) -> Vec<f32> {
        let mut place = self.place.clone();
        let n = place.len();
        let from = self.page_at(part.head.last).unwrap_or(0);
        let mut next = self.seen;
        for i in (from..n).chain(0..from) {
            if place[i].is_nan() {
                place[i] = next as f32;
                next += 1;
            }
        }
        place
    }
}

/// How close together the `shown` pages (ascending, below `n`, not empty) lie: the share of
/// the pages they span that the closest [`DENSE_SHARE`] of them are, round the end. A
/// sweep's are close together, random writes' spread over all. The rest are left out: a few
/// pages the guest writes elsewhere with its sweep (on the testbed, the ledger at the start
/// of the first vCPU's share) would otherwise stretch the span from its run to theirs.
fn density(shown: &[usize], n: usize) -> f32 {
    let len = shown.len();
    let m = (len as f32 * DENSE_SHARE).ceil().max(1.0) as usize;
    let span = (0..len)
        .map(|k| {
            let e = k + m - 1;
            let last = if e < len {
                shown[e]
            } else {
                shown[e - len] + n
            };
            last - shown[k] + 1
        })
        .min()
        .unwrap_or(n);
    m as f32 / span as f32
}

/// The first and last of the `places` a read showed written that belong to the sweep's run
/// (the last a lap on if the run goes past the end of an order of `lap` places). Besides the
/// sweep, a guest rewrites a few pages over and over (its stack, counters), which show
/// wherever they were sent since: the run is the densest quarter lap of the places, its
/// outer hundredths left out.
fn sweep_run(places: &mut [f32], lap: f32) -> (f32, f32) {
    places.sort_by(f32::total_cmp);
    let n = places.len();
    // Place `k` of the order doubled (the second time a lap on), so that a run may wrap.
    let at = |k: usize| {
        if k < n {
            places[k]
        } else {
            places[k - n] + lap
        }
    };
    let (mut best, mut end) = ((0, 0), 0);
    for start in 0..n {
        end = end.max(start);
        while end < start + n && at(end) < at(start) + 0.25 * lap {
            end += 1;
        }
        if end - start > best.1 - best.0 {
            best = (start, end);
        }
    }
    let (start, end) = best;
    let trim = (end - start) / 100;
    let first = at(start + trim);
    let last = at(end - 1 - trim);
    // A run that starts past the end of the order starts at its beginning.
    if first >= lap {
        (first - lap, last - lap)
    } else {
        (first, last)
    }
}

/// Where a sample of the pages stands in a sweep, by where they stand in the migration: what a
/// [`WriteClock`] saw at the last read. A page's place is how many sampled pages come before
/// it in the sweep's order: the pages seen written first, in the order first seen, then the
/// others.
#[derive(Clone, Default, PartialEq)]
pub struct SweepOrder {
    /// Pages each sample stands for.
    pub stride: f64,
    /// When the log was read, in the migration's clock ([`super::Progress::elapsed`]).
    pub taken: Duration,
    /// The never-sent pages, in the order they will be sent: their places, and the part of
    /// [`SweepOrder::parts`] whose order they stand in (0 when there are none).
    pub never_sent: Vec<(f32, u16)>,
    /// The pages sent and not written since.
    pub clean: Vec<(f32, u16)>,
    /// The pages sent and written since.
    pub dirty: Vec<(f32, u16)>,
    /// The sweep over all the pages, in the order they were first seen written.
    pub whole: Part,
    /// When the vCPUs sweep their own shares of memory at once, each share's sweep, in page
    /// order (the places of its pages are in its own order); empty when one sweep is followed.
    /// Two sweeps at different speeds stand at two places in one order, and a read's densest
    /// run is one or the other.
    pub parts: Vec<Part>,
    /// The pages the reads show written again are spread over the order: the guest writes at
    /// random, not in a sweep ([`WriteClock`]'s `scatter`).
    pub scattered: bool,
}

/// One sweep as the log showed it: over all the pages ([`SweepOrder::whole`]) or over a share
/// of them ([`SweepOrder::parts`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Part {
    /// Where it stood at the latest read that showed writes, in its order.
    pub head: Head,
    /// Its sampled pages seen written: the first places of its order.
    pub seen: usize,
    /// Its sampled pages.
    pub samples: usize,
    /// Sampled places per second it moved on by lately, as the log showed it; 0 if not
    /// measured.
    pub speed: f64,
    /// The sampled pages it covers: once it has come round, those seen
    /// ([`WriteClock::covered`]); once it has reached the end of the pages it covers and gone
    /// back to their start (its first lap since the probe not over yet), the sampled pages
    /// from the first it wrote to the last, in page order ([`WriteClock::extent`]).
    pub extent: Option<usize>,
}

/// The pages a read of the log showed written, as places in the sweep's order: where the
/// sweep stood.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Head {
    /// The first and last of them (the last may lie a lap on, past the end of the order).
    pub first: f32,
    pub last: f32,
    /// Seconds since the read before, and since this read when the snapshot was made.
    pub span: f32,
    pub age: f32,
}

impl Head {
    /// Where the sweep stands at the snapshot, at `speed` places per second. At the read, it
    /// had passed the last page shown, and the first was written after the read before, so
    /// it had gone no further than the first plus `span` seconds; it is taken halfway.
    fn at(&self, speed: f64) -> f64 {
        let passed = f64::from(self.last);
        let reach = f64::from(self.first) + f64::from(self.span) * speed;
        0.5 * (passed + reach.max(passed)) + f64::from(self.age) * speed
    }
}

impl fmt::Debug for SweepOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SweepOrder {{ stride: {}, samples: never_sent {}, clean {}, dirty {}, seen {}, \
             speed {:.0}/s, {:?}, parts {}, scattered {} }}",
            self.stride,
            self.never_sent.len(),
            self.clean.len(),
            self.dirty.len(),
            self.whole.seen,
            self.whole.speed,
            self.whole.head,
            self.parts.len(),
            self.scattered
        )?;
        for q in &self.parts {
            write!(
                f,
                " [seen {} of {}, speed {:.0}/s, head {:.0}..{:.0}]",
                q.seen, q.samples, q.speed, q.head.first, q.head.last
            )?;
        }
        Ok(())
    }
}

/// A sampled page as a forecast sees it: when it goes out and when it is written.
#[derive(Debug, Clone, Copy)]
pub struct SweptPage {
    /// Seconds from now until it is sent (0 if it was sent already).
    pub sent_in: f64,
    /// Whether it is dirty now.
    pub dirty: bool,
    /// Seconds from now to its next write, in `(0, period]`.
    next: f64,
    period: f64,
}

impl SweptPage {
    /// Whether the sweep writes it in `(from, to]`, seconds from now.
    pub fn written_in(&self, from: f64, to: f64) -> bool {
        self.write_after(from) <= to
    }

    /// Seconds from now back to its latest write (negative).
    pub fn written_last(&self) -> f64 {
        self.next - self.period
    }

    /// Seconds from now to its first write after `from`.
    pub fn write_after(&self, from: f64) -> f64 {
        let laps = ((from - self.next) / self.period).floor() + 1.0;
        self.next + laps.max(0.0) * self.period
    }

    /// Seconds from now to its last write by `to`; `None` if not written by then.
    pub fn last_write_by(&self, to: f64) -> Option<f64> {
        (self.next <= to)
            .then(|| self.next + ((to - self.next) / self.period).floor() * self.period)
    }

    /// Whether the sweep writes it after its send and by `to`.
    pub fn dirtied_by(&self, to: f64) -> bool {
        self.sent_in < to && self.written_in(self.sent_in, to)
    }
}

impl SweepOrder {
    /// The sweeps followed: the shares' when there are [`SweepOrder::parts`], else the one
    /// over all the pages. A page's part number indexes them.
    pub fn sweeps(&self) -> &[Part] {
        if self.parts.is_empty() {
            std::slice::from_ref(&self.whole)
        } else {
            &self.parts
        }
    }

    /// Each sampled page the sweep writes, over `set` pages with a `period` in seconds (one
    /// `(period, set)` a part, when there are [`SweepOrder::parts`]), at `now` in the
    /// migration's clock: the never-sent ones still never-sent (`never_sent` of them, fewer
    /// than at the read: the first ones in the order went out since, just now) going out evenly
    /// over the next `sending` seconds; pages placed past `set` are not in the sweep, and are
    /// left out. Sum what the forecast needs and multiply by [`SweepOrder::stride`].
    pub fn pages<'a>(
        &'a self,
        shapes: &[(f64, f64)],
        now: Duration,
        never_sent: u64,
        sending: f64,
    ) -> impl Iterator<Item = SweptPage> + 'a {
        let since = now.saturating_sub(self.taken).as_secs_f64();
        let left = ((never_sent as f64 / self.stride).ceil() as usize).min(self.never_sent.len());
        let gone = self.never_sent.len() - left;
        let n = left.max(1) as f64;
        // In sampled pages, per sweep: its length (at least the pages seen), its speed, where
        // it stands now, and its period.
        let sweeps: Vec<(f64, f64, f64, f64)> = self
            .sweeps()
            .iter()
            .zip(shapes)
            .map(|(q, &(period, set))| {
                let lap = (set / self.stride).max(q.seen as f64).max(1.0);
                let speed = lap / period;
                (lap, speed, q.head.at(speed) + since * speed, period)
            })
            .collect();
        let never =
            self.never_sent
                .iter()
                .enumerate()
                .map(move |(k, &x)| match k.checked_sub(gone) {
                    // The k-th of n goes out at the end of its share of the time.
                    Some(k) => (sending * (k as f64 + 1.0) / n, false, x),
                    None => (0.0, false, x),
                });
        let clean = self.clean.iter().map(|&x| (0.0, false, x));
        let dirty = self.dirty.iter().map(|&x| (0.0, true, x));
        never
            .chain(clean)
            .chain(dirty)
            .filter_map(move |(sent_in, dirty, (x, r))| {
                let &(lap, speed, head, period) = sweeps.get(usize::from(r))?;
                // Pages ahead of the sweep, in its order; one just written is a lap ahead.
                let ahead = lap - (head - f64::from(x)).rem_euclid(lap);
                (f64::from(x) < lap).then_some(SweptPage {
                    sent_in,
                    dirty,
                    next: ahead / speed,
                    period,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page is placed by its first seen write; ties go in page order. The latest read that
    /// showed writes shows where the sweep stands; a page re-armed (sent) and written again
    /// keeps its place.
    #[test]
    fn pages_are_placed_in_the_order_first_seen() {
        let mut c = WriteClock::new(4);
        c.read(0.0, |_| false);
        c.read(1.0, |p| p == 2);
        c.read(2.0, |p| p >= 2);
        let s = c.snapshot(2.5, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!((s.clean[2].0, s.clean[3].0), (0.0, 1.0));
        // Not seen yet: after the others, from where the sweep stands (page 3) in page order.
        assert_eq!((s.clean[0].0, s.clean[1].0, s.whole.seen), (2.0, 3.0, 2));
        let h = s.whole.head;
        assert_eq!((h.first, h.last, h.span, h.age), (1.0, 1.0, 1.0, 0.5));
        // Page 2 re-armed (sent) and written again: the sweep has come round to it; its place
        // stays. Page 0 is new, after the others.
        c.read(3.0, |p| p == 3);
        c.read(4.0, |p| p != 1);
        let s = c.snapshot(4.0, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!((s.clean[0].0, s.clean[2].0, s.clean[3].0), (2.0, 0.0, 1.0));
    }

    /// A sweep over pages 100..300 of 400, seen from page 200 on: one run until it goes back
    /// to page 100, two after, and what it covers is known before it has come round; a hole
    /// (pages sent between their write and the read) does not count as a way round.
    #[test]
    fn a_sweep_that_went_back_to_its_start_shows_what_it_covers() {
        let mut c = WriteClock::new(400);
        c.read(0.0, |_| false);
        let extent = |c: &WriteClock, at| c.snapshot(at, Duration::ZERO, 0, |_| PageState::Clean);
        c.read(1.0, |p| (200..250).contains(&p));
        c.read(2.0, |p| (250..300).contains(&p) && !(270..273).contains(&p));
        assert_eq!(extent(&c, 2.0).whole.extent, None, "one run, with a hole");
        c.read(3.0, |p| (100..140).contains(&p));
        assert_eq!(extent(&c, 3.0).whole.extent, Some(200));
        c.read(4.0, |p| (140..180).contains(&p));
        assert_eq!(extent(&c, 4.0).whole.extent, Some(200));
    }

    /// A sweep over pages 100..200 of 400 that has come round writes pages whose bits are still
    /// set (not sent since): the reads show nothing new, and it covers what was seen. Until
    /// then, what it covers is not known.
    #[test]
    fn a_sweep_that_shows_nothing_new_covers_what_it_has_seen() {
        let mut c = WriteClock::with_shares(800, 2);
        let covers = |c: &WriteClock, at| {
            let s = c.snapshot(at, Duration::ZERO, 0, |_| PageState::NeverSent);
            (
                s.whole.extent,
                s.parts.iter().map(|q| q.extent).collect::<Vec<_>>(),
            )
        };
        // Both shares' sweeps, 20 pages a read; the first share's over 100..200, the second's
        // over all of its 400.
        for k in 0..5u64 {
            c.read(k as f64 * 0.1, |p| {
                (100..120 + 20 * k).contains(&p) || (400..420 + 20 * k).contains(&p)
            });
        }
        assert_eq!(covers(&c, 0.4), (None, vec![None, None]));
        // The first has come round: nothing new in its share from here on.
        for k in 5..10u64 {
            c.read(k as f64 * 0.1, |p| {
                (100..200).contains(&p) || (400..420 + 20 * k).contains(&p)
            });
        }
        assert_eq!(covers(&c, 0.9), (None, vec![Some(100), None]));
    }

    /// A sweep that would have shown a thousand new pages since the last read and showed none
    /// has come round at that read; a slow one only after [`COVERED_AFTER`].
    #[test]
    fn a_fast_sweep_that_shows_nothing_new_has_come_round_at_once() {
        let covered = |per_read: u64, quiet_reads: u64| {
            let mut c = WriteClock::new(16384);
            for k in 0..6u64 {
                c.read(k as f64 * 0.1, |p| p < per_read * (k + 1));
            }
            let last = 5 + quiet_reads;
            for k in 6..=last {
                c.read(k as f64 * 0.1, |p| p < per_read * 6);
            }
            c.snapshot(last as f64 * 0.1, Duration::ZERO, 0, |_| PageState::Clean)
                .whole
                .extent
        };
        assert_eq!(covered(1024, 0), None);
        assert_eq!(covered(1024, 1), Some(6144));
        assert_eq!(covered(20, 1), None);
        assert_eq!(covered(20, 2), None);
        assert_eq!(covered(20, 3), Some(120));
    }

    /// A read that spans the end of the sweep's order and its start ends a lap on.
    #[test]
    fn the_sweep_stands_past_the_wrap() {
        let mut c = WriteClock::new(8);
        for (t, p) in (0..8).enumerate() {
            c.read(t as f64, |q| q == p);
        }
        // Pages 7 and 0 written again (re-armed in between): it wrapped onto 0.
        c.read(8.5, |_| false);
        c.read(9.0, |q| q == 7 || q == 0);
        let s = c.snapshot(9.0, Duration::ZERO, 0, |_| PageState::Clean);
        let h = s.whole.head;
        assert_eq!((h.first, h.last, h.span), (7.0, 8.0, 0.5));
        // Ten places a second: it had passed place 8 and gone no further than 7 + 5.
        assert_eq!(h.at(10.0), 10.0);
    }

    /// Two sweeps at once, each in its half of the pages, the second twice as fast, are
    /// followed apart: each half's pages in its own order, each sweep at its own speed. One
    /// sweep over all the pages, which shows in one half at a time, is not.
    #[test]
    fn sweeps_in_two_shares_at_once_are_followed_apart() {
        // 400 pages, two shares of 200; every page re-armed (sent) right after each read.
        let mut c = WriteClock::with_shares(400, 2);
        for k in 0..8u64 {
            let (a, b) = (k * 20 % 200, 200 + k * 40 % 200);
            c.read(k as f64 * 0.1, |p| {
                (a..a + 20).contains(&p) || (b..b + 40).contains(&p)
            });
        }
        let s = c.snapshot(0.75, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!(s.parts.len(), 2);
        assert_eq!(
            (s.clean[0], s.clean[200], s.clean[239]),
            ((0.0, 0), (0.0, 1), (39.0, 1))
        );
        let (slow, fast) = (s.parts[0].speed, s.parts[1].speed);
        assert!((fast / slow - 2.0).abs() < 0.1, "{slow} {fast}");
        let mut c = WriteClock::with_shares(400, 2);
        for k in 0..30u64 {
            let a = k * 30 % 400;
            c.read(k as f64 * 0.1, |p| (a..a + 30).contains(&p));
        }
        let s = c.snapshot(3.0, Duration::ZERO, 0, |_| PageState::Clean);
        assert!(s.parts.is_empty(), "{s:?}");
    }

    /// The testbed's guest counts each write in a ledger at the start of memory (in the first
    /// share), an entry a page: as each vCPU's sweep moves on, a read shows a new ledger page
    /// for it there, far from the first share's sweep. The sweeps are still followed apart.
    #[test]
    fn a_ledger_written_with_the_sweeps_leaves_them_apart() {
        // 4000 pages, two shares of 2000; the first share's sweep from page 1000 on, 50
        // pages a read, the second's from 3000; the ledger pages 10 + k and 30 + k at read k.
        let mut c = WriteClock::with_shares(4000, 2);
        for k in 0..8u64 {
            let (a, b) = (1000 + k * 50, 3000 + k * 50);
            c.read(k as f64 * 0.1, |p| {
                p == 10 + k || p == 30 + k || (a..a + 50).contains(&p) || (b..b + 50).contains(&p)
            });
        }
        let s = c.snapshot(0.8, Duration::ZERO, 0, |_| PageState::Clean);
        assert_eq!(s.parts.len(), 2, "{s:?}");
    }

    /// A page below `pages` at random (a linear congruential generator over `x`).
    fn random_page(x: &mut u64, pages: u64) -> u64 {
        *x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*x >> 33) % pages
    }

    /// A guest that writes at random in both shares at once is not taken for two sweeps.
    #[test]
    fn random_writes_in_two_shares_are_not_two_sweeps() {
        let mut c = WriteClock::with_shares(4000, 2);
        let mut x = 1u64;
        for k in 0..16 {
            // 100 pages a read, at random over all of them.
            let pages: Vec<u64> = (0..100).map(|_| random_page(&mut x, 4000)).collect();
            c.read(f64::from(k) * 0.1, |p| pages.contains(&p));
        }
        let s = c.snapshot(1.6, Duration::ZERO, 0, |_| PageState::Clean);
        assert!(s.parts.is_empty(), "{s:?}");
    }

    /// Writes at random within a set of pages are told from a sweep: once pages are written
    /// again, they fall all over the order.
    #[test]
    fn random_writes_are_scattered_and_sweeps_are_not() {
        let mut x = 1u64;
        let mut c = WriteClock::with_shares(4000, 2);
        let mut pages = Vec::new();
        for k in 0..24 {
            // 100 pages a read, at random over the first 2000, re-armed after 4 reads.
            if k % 4 == 0 {
                pages.clear();
            }
            pages.extend((0..100).map(|_| random_page(&mut x, 2000)));
            c.read(f64::from(k) * 0.1, |p| pages.contains(&p));
        }
        let s = c.snapshot(2.4, Duration::ZERO, 0, |_| PageState::Clean);
        assert!(s.scattered, "{s:?}");

        // Two sweeps, one a share, 50 pages a read each, over their laps again and again.
        let mut c = WriteClock::with_shares(4000, 2);
        for k in 0..120u64 {
            let at = |share: u64| share * 2000 + (k * 50) % 2000;
            let (a, b) = (at(0), at(1));
            c.read(k as f64 * 0.1, |p| {
                (a..a + 50).contains(&p) || (b..b + 50).contains(&p)
            });
        }
        let s = c.snapshot(12.0, Duration::ZERO, 0, |_| PageState::Clean);
        assert!(!s.scattered, "{s:?}");
    }

    /// The sweep's run among a read's pages: the densest quarter lap, a lap on past the end.
    #[test]
    fn a_few_pages_written_elsewhere_are_not_the_sweep() {
        // 100 places; the run 40..=49, and pages at 5 and 90 written too.
        let mut places: Vec<f32> = (40..50).chain([5, 90]).map(|x| x as f32).collect();
        assert_eq!(sweep_run(&mut places, 100.0), (40.0, 49.0));
        // The run 95..=99, 0..=4 wraps; a page at 50.
        let mut places: Vec<f32> = (0..5)
            .chain(95..100)
            .chain([50])
            .map(|x| x as f32)
            .collect();
        assert_eq!(sweep_run(&mut places, 100.0), (95.0, 104.0));
    }

    /// The sweep's speed is where it stood read after read: 20 pages every 0.1 s, 200 a
    /// second once three steps are seen. A read that shows nothing starts the count again
    /// (the sweep may have gone round meanwhile), as does a change of the guest's speed.
    #[test]
    fn the_sweep_moves_on_at_the_speed_the_reads_show() {
        let mut c = WriteClock::new(1000);
        // A first lap: by read `k`, the pages below 20 k are written.
        let read = |c: &mut WriteClock, k: u64| c.read(k as f64 * 0.1, |p| p < 20 * k);
        for k in 0..=3 {
            read(&mut c, k);
        }
        assert_eq!(c.speed(), 0.0, "two steps are not enough");
        read(&mut c, 4);
        assert!((c.speed() - 200.0).abs() < 0.1, "{}", c.speed());
        // A read at 0.5 s that shows nothing, then the sweep shown again.
        c.read(0.5, |p| p < 80);
        for k in 6..=8 {
            read(&mut c, k);
        }
        assert_eq!(c.speed(), 0.0, "counted again from 0.5 s");
        read(&mut c, 9);
        assert!((c.speed() - 200.0).abs() < 0.1, "{}", c.speed());
        c.speed_changes(0.9);
        for k in 10..=12 {
            read(&mut c, k);
        }
        assert_eq!(c.speed(), 0.0, "counted again from the change");
    }

    /// A large guest is sampled; the never-sent pages come in sending order from the cursor.
    #[test]
    fn samples_go_in_sending_order() {
        let mut c = WriteClock::new(4 * SAMPLES);
        assert_eq!(c.place.len() as u64, SAMPLES);
        c.read(1.0, |p| p % 8 == 0);
        let s = c.snapshot(1.5, Duration::ZERO, 2 * SAMPLES, |p| {
            if p % 8 == 0 {
                PageState::NeverSent
            } else {
                PageState::Dirty
            }
        });
        assert_eq!(s.stride, 4.0);
        assert_eq!(s.never_sent.len() as u64, SAMPLES / 2);
        assert_eq!(s.whole.seen as u64, SAMPLES / 2);
        assert!(s.dirty.iter().all(|&(a, _)| a >= (SAMPLES / 2) as f32));
        // From the cursor (sample SAMPLES / 2, the (SAMPLES / 4)-th seen), then from the start.
        assert_eq!(s.never_sent[0].0, (SAMPLES / 4) as f32);
        assert_eq!(s.never_sent[(SAMPLES / 4) as usize].0, 0.0);
    }

    /// Ten pages a second, ten in the sweep, four seen (one page not in it): the sweep stood at
    /// the fourth 0.1 s
    /// before the read (the read before showed none) and the read was 0.1 s ago, so it has
    /// reached the sixth. The pages not
    /// seen come next, then the first ones seen.
    #[test]
    fn the_sweep_comes_back_in_its_order() {
        let lw = SweepOrder {
            stride: 1.0,
            taken: Duration::from_millis(100),
            never_sent: vec![(0.0, 0)],
            clean: vec![(2.0, 0), (3.0, 0)],
            dirty: vec![(1.0, 0), (f32::NAN, 0)],
            whole: Part {
                head: Head {
                    first: 3.0,
                    last: 3.0,
                    span: 0.0,
                    age: 0.1,
                },
                seen: 4,
                samples: 5,
                speed: 0.0,
                extent: None,
            },
            parts: Vec::new(),
            scattered: false,
        };
        let pages: Vec<_> = lw
            .pages(&[(1.0, 10.0)], Duration::from_millis(200), 1, 0.75)
            .collect();
        assert_eq!(pages.len(), 4);
        let (never, clean) = (pages[0], pages[1]);
        // Page at place 0: five places ahead (6, 7, 8, 9, then 0), 0.5 s away.
        assert!(never.written_in(0.0, 0.51) && !never.written_in(0.0, 0.49));
        assert!((never.sent_in - 0.75).abs() < 1e-9);
        assert!(!never.dirtied_by(1.49) && never.dirtied_by(1.51));
        // Place 2: seven ahead, at 0.7 s, then 1.7 s.
        assert!(clean.written_in(0.0, 0.71) && !clean.written_in(0.0, 0.69));
        assert!(clean.written_in(0.71, 1.71) && !clean.written_in(0.71, 1.69));
        assert!(clean.dirtied_by(0.71) && !clean.dirtied_by(0.69));
    }
}
