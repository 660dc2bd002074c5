//! `ferry report plot`: the timeline of one migration ([`Report::timeline`]) drawn as an SVG.
//!
//! Stacked panels share one time axis (seconds since the live phase began): wire throughput
//! per lane, the dirty and never-sent sets, and the vCPU throttle (only when the migration
//! throttled or packed the vCPUs). The stop-and-copy and switchover are shaded on every
//! panel. [`render`] is pure (report in, SVG text out); [`run`] does the file I/O.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use ferry_engine::report::{Phase, Report, Sample};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

#[derive(Args)]
pub struct PlotArgs {
    /// The report: the JSON object `ferry migrate --json` or `ferry demo --json` prints, or
    /// a `ferry migrate --progress-json` stream, whose last line is the report.
    report: PathBuf,
    /// Where to write the SVG (default: REPORT with the extension `.svg`).
    #[arg(short, long)]
    out: Option<PathBuf>,
}

const PAGE_BYTES: f64 = 4096.0;
const MIB: f64 = (1u64 << 20) as f64;

/// Whole image width; the legend strip on the right of each panel is part of it.
const WIDTH: u32 = 1100;
const LEGEND_WIDTH: u32 = 170;
const RIGHT_AXIS_WIDTH: u32 = 60;
const TITLE_HEIGHT: u32 = 40;
const THROUGHPUT_HEIGHT: u32 = 300;
const MEMORY_HEIGHT: u32 = 260;
const THROTTLE_HEIGHT: u32 = 200;
const FONT: &str = "sans-serif";

/// Lane colours, reused in turn when there are more lanes.
const LANE_COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const STOP_AND_COPY_COLOR: RGBColor = RGBColor(214, 39, 40);
const SWITCHOVER_COLOR: RGBColor = RGBColor(120, 120, 120);

pub fn run(a: PlotArgs) -> anyhow::Result<i32> {
    let report = load(&a.report)?;
    let out = a.out.unwrap_or_else(|| a.report.with_extension("svg"));
    if out == a.report {
        bail!(
            "{} would be overwritten by its own plot: give another path with -o",
            a.report.display()
        );
    }
    let svg = render(&report).with_context(|| format!("plotting {}", a.report.display()))?;
    std::fs::write(&out, svg).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("ferry: wrote {}", out.display());
    Ok(0)
}

/// Reads a report from `path`: one JSON object, or JSON lines whose last report-shaped line
/// is taken (progress events before it are skipped).
fn load(path: &Path) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| {
        format!(
            "{} holds no migration report (expected the JSON of `ferry migrate --json` or \
             a `--progress-json` stream ending with the report)",
            path.display()
        )
    })
}

fn parse(text: &str) -> Option<Report> {
    if let Ok(r) = serde_json::from_str::<Report>(text) {
        return Some(r);
    }
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .find_map(|l| serde_json::from_str::<Report>(l).ok())
}

/// Wire throughput derived from the cumulative per-lane byte counts of the samples.
#[derive(Debug, Default, PartialEq)]
struct Rates {
    /// End of each interval, in seconds.
    t_s: Vec<f64>,
    /// MiB/s of each lane over each interval.
    lanes: Vec<Vec<f64>>,
    /// The sum over the lanes.
    total: Vec<f64>,
}

/// One rate per interval between samples and per lane. A lane missing from a sample (it
/// opened later, or the sample lists fewer lanes) carried nothing new in it; a count that went
/// down counts as no progress. A sample no later than the previous one is skipped, so its
/// bytes fall into the next interval with time.
fn lane_rates(samples: &[Sample]) -> Rates {
    let lanes = samples
        .iter()
        .map(|s| s.lane_bytes.len())
        .max()
        .unwrap_or(0);
    let mut rates = Rates {
        lanes: vec![Vec::new(); lanes],
        ..Rates::default()
    };
    let Some((first, rest)) = samples.split_first() else {
        return rates;
    };
    let mut last = vec![0u64; lanes];
    last[..first.lane_bytes.len()].copy_from_slice(&first.lane_bytes);
    let mut last_t = first.t_ms;
    for s in rest {
        let dt_s = (s.t_ms - last_t) / 1e3;
        if dt_s.is_nan() || dt_s <= 0.0 {
            continue;
        }
        let mut total = 0.0;
        for (lane, (series, last)) in rates.lanes.iter_mut().zip(&mut last).enumerate() {
            let now = s.lane_bytes.get(lane).copied().unwrap_or(*last);
            let rate = now.saturating_sub(*last) as f64 / MIB / dt_s;
            *last = now;
            series.push(rate);
            total += rate;
        }
        rates.t_s.push(s.t_ms / 1e3);
        rates.total.push(total);
        last_t = s.t_ms;
    }
    rates
}

/// The span of `phase` in seconds: from its first sample to the next sample of another
/// phase (or to its own last sample when none follows).
fn phase_span(samples: &[Sample], phase: Phase) -> Option<(f64, f64)> {
    let start = samples.iter().position(|s| s.phase == phase)?;
    let after = &samples[start..];
    let end = match after.iter().position(|s| s.phase != phase) {
        Some(i) => after[i].t_ms,
        None => after[after.len() - 1].t_ms,
    };
    Some((samples[start].t_ms / 1e3, end / 1e3))
}

/// The image's title line.
fn title(r: &Report) -> String {
    let bound = match r.bound_ms {
        Some(b) => format!("{b:.0} ms"),
        None => "none".into(),
    };
    format!(
        "{}: total {:.0} ms, downtime {:.1} ms, bound {}, memory {:.0} MiB",
        r.policy,
        r.total_ms,
        r.downtime_ms,
        bound,
        r.mem_bytes as f64 / MIB
    )
}

/// One line of a panel.
struct Series {
    label: String,
    color: RGBColor,
    width: u32,
    points: Vec<(f64, f64)>,
}

/// A shaded phase.
struct Band {
    label: &'static str,
    color: RGBColor,
    span: (f64, f64),
}

/// One panel: lines against the left axis, and optionally one against a right axis.
struct Panel {
    caption: &'static str,
    height: u32,
    y_desc: &'static str,
    /// Fixed top of the left axis; otherwise from the data.
    y_top: Option<f64>,
    series: Vec<Series>,
    right: Option<(&'static str, Series)>,
}

/// Draws the timeline of `report` and returns the SVG text.
pub fn render(report: &Report) -> anyhow::Result<String> {
    let samples = &report.timeline;
    if samples.is_empty() {
        bail!("report has no timeline samples");
    }
    let mut panels = vec![throughput_panel(samples), memory_panel(samples)];
    if let Some(p) = throttle_panel(samples) {
        panels.push(p);
    }
    let bands: Vec<Band> = [
        (Phase::StopAndCopy, STOP_AND_COPY_COLOR),
        (Phase::Switchover, SWITCHOVER_COLOR),
    ]
    .into_iter()
    .filter_map(|(phase, color)| {
        Some(Band {
            label: phase.name(),
            color,
            span: phase_span(samples, phase)?,
        })
    })
    .collect();
    let t0 = samples.iter().map(|s| s.t_ms).fold(f64::INFINITY, f64::min) / 1e3;
    let t1 = samples
        .iter()
        .map(|s| s.t_ms)
        .fold(f64::NEG_INFINITY, f64::max)
        / 1e3;
    let x = t0..if t1 > t0 { t1 } else { t0 + 1.0 };

    let height = TITLE_HEIGHT + panels.iter().map(|p| p.height).sum::<u32>();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (head, mut body) = root.split_vertically(TITLE_HEIGHT);
        head.draw_text(
            &title(report),
            &TextStyle::from((FONT, 22).into_font())
                .pos(Pos::new(HPos::Center, VPos::Center))
                .color(&BLACK),
            (WIDTH as i32 / 2, TITLE_HEIGHT as i32 / 2),
        )?;
        for (i, panel) in panels.iter().enumerate() {
            let (area, below) = body.split_vertically(panel.height);
            let last = i + 1 == panels.len();
            // The phase swatches go in the first panel's legend only.
            let legend_bands = if i == 0 { &bands[..] } else { &[] };
            draw_panel(&area, panel, x.clone(), &bands, legend_bands, last)?;
            body = below;
        }
        root.present()?;
    }
    Ok(svg)
}

fn throughput_panel(samples: &[Sample]) -> Panel {
    let rates = lane_rates(samples);
    let mut series: Vec<Series> = rates
        .lanes
        .iter()
        .enumerate()
        .map(|(lane, r)| Series {
            label: format!("lane {lane}"),
            color: LANE_COLORS[lane % LANE_COLORS.len()],
            width: 2,
            points: rates.t_s.iter().copied().zip(r.iter().copied()).collect(),
        })
        .collect();
    if rates.lanes.len() > 1 {
        series.push(Series {
            label: "all lanes".into(),
            color: BLACK,
            width: 2,
            points: rates.t_s.iter().copied().zip(rates.total).collect(),
        });
    }
    Panel {
        caption: "wire throughput",
        height: THROUGHPUT_HEIGHT,
        y_desc: "MiB/s",
        y_top: None,
        series,
        right: None,
    }
}

fn memory_panel(samples: &[Sample]) -> Panel {
    let pages = |label: &str, color: RGBColor, f: fn(&Sample) -> u64| Series {
        label: label.into(),
        color,
        width: 2,
        points: samples
            .iter()
            .map(|s| (s.t_ms / 1e3, f(s) as f64 * PAGE_BYTES / MIB))
            .collect(),
    };
    let mut series = vec![
        pages("never sent", RGBColor(31, 119, 180), |s| s.never_sent_pages),
        pages("dirty", STOP_AND_COPY_COLOR, |s| s.dirty_pages),
    ];
    if samples.iter().any(|s| s.hot_pages > 0) {
        series.push(pages("hot (of dirty)", RGBColor(255, 127, 14), |s| {
            s.hot_pages
        }));
    }
    Panel {
        caption: "memory left to send",
        height: MEMORY_HEIGHT,
        y_desc: "MiB",
        y_top: None,
        series,
        right: None,
    }
}

/// `None` when the migration neither throttled nor packed the vCPUs.
fn throttle_panel(samples: &[Sample]) -> Option<Panel> {
    let cores: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.t_ms / 1e3, s.vcpu_cores? as f64)))
        .collect();
    if cores.is_empty() && samples.iter().all(|s| s.throttle <= 0.0) {
        return None;
    }
    let throttle = Series {
        label: "throttle".into(),
        color: RGBColor(148, 103, 189),
        width: 2,
        points: samples
            .iter()
            .map(|s| (s.t_ms / 1e3, s.throttle * 100.0))
            .collect(),
    };
    let right = (!cores.is_empty()).then(|| {
        (
            "vCPU cores",
            Series {
                label: "vCPU cores".into(),
                color: RGBColor(44, 160, 44),
                width: 2,
                points: cores,
            },
        )
    });
    Some(Panel {
        caption: "vCPU throttle",
        height: THROTTLE_HEIGHT,
        y_desc: "% of vCPU time",
        y_top: Some(100.0),
        series: vec![throttle],
        right,
    })
}

/// A top for an axis showing `points`: a little above the largest value, at least 1.
fn y_top<'a>(points: impl IntoIterator<Item = &'a (f64, f64)>) -> f64 {
    let max = points.into_iter().map(|p| p.1).fold(0.0, f64::max);
    (max * 1.1).max(1.0)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
    x: Range<f64>,
    bands: &[Band],
    legend_bands: &[Band],
    last: bool,
) -> anyhow::Result<()> {
    let (plot_area, legend_area) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    let top = panel
        .y_top
        .unwrap_or_else(|| y_top(panel.series.iter().flat_map(|s| &s.points)));
    // Every panel keeps a right axis area, used or not, so that their time axes line up.
    let right_top = match &panel.right {
        Some((_, s)) => s.points.iter().map(|p| p.1).fold(0.0, f64::max).ceil() + 1.0,
        None => 1.0,
    };
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(panel.caption, (FONT, 16))
        .margin(8)
        .x_label_area_size(if last { 40 } else { 25 })
        .y_label_area_size(70)
        .right_y_label_area_size(RIGHT_AXIS_WIDTH)
        .build_cartesian_2d(x.clone(), 0.0..top)?
        .set_secondary_coord(x, 0.0..right_top);
    // Drawn after the secondary coordinates took the right axis, so the primary labels
    // are not repeated there.
    let y_label = |v: &f64| axis_label(*v, top);
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(panel.y_desc)
        .y_label_formatter(&y_label)
        .light_line_style(RGBColor(245, 245, 245))
        .label_style((FONT, 12));
    if last {
        mesh.x_desc("time since the live phase began (s)");
    }
    mesh.draw()?;

    for b in bands {
        chart.draw_series(std::iter::once(Rectangle::new(
            [(b.span.0, 0.0), (b.span.1, top)],
            b.color.mix(0.15).filled(),
        )))?;
        // Edges too, so a phase shorter than a pixel still shows.
        chart.draw_series([b.span.0, b.span.1].map(|t| {
            PathElement::new(vec![(t, 0.0), (t, top)], b.color.mix(0.6).stroke_width(1))
        }))?;
    }
    let mut legend: Vec<(&str, ShapeStyle, bool)> = Vec::new();
    for s in &panel.series {
        let style = s.color.stroke_width(s.width);
        chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?;
        legend.push((s.label.as_str(), style, false));
    }
    if let Some((desc, s)) = &panel.right {
        chart
            .configure_secondary_axes()
            .y_desc(*desc)
            .y_labels(right_top as usize + 1)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style((FONT, 12))
            .draw()?;
        let style = s.color.stroke_width(s.width);
        chart.draw_secondary_series(LineSeries::new(s.points.iter().copied(), style))?;
        legend.push((s.label.as_str(), style, false));
    }
    legend.extend(
        legend_bands
            .iter()
            .map(|b| (b.label, b.color.mix(0.3).filled(), true)),
    );
    draw_legend(&legend_area, &legend)
}

/// A tick label on an axis whose top is `top`: decimals only where they tell something.
fn axis_label(v: f64, top: f64) -> String {
    if top >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The legend in its own strip right of the plot, so it never hides a line.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[(&str, ShapeStyle, bool)],
) -> anyhow::Result<()> {
    let font = TextStyle::from((FONT, 14).into_font())
        .pos(Pos::new(HPos::Left, VPos::Center))
        .color(&BLACK);
    for (i, (label, style, swatch)) in entries.iter().enumerate() {
        let y = 45 + 22 * i as i32;
        if *swatch {
            area.draw(&Rectangle::new([(6, y - 6), (30, y + 6)], *style))?;
        } else {
            area.draw(&PathElement::new(vec![(6, y), (30, y)], *style))?;
        }
        area.draw_text(label, &font, (38, y))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_ms: f64, lane_bytes: &[u64]) -> Sample {
        Sample {
            t_ms,
            lane_bytes: lane_bytes.to_vec(),
            ..Sample::default()
        }
    }

    /// A 1 GiB, two-lane migration sampled every 100 ms: 3 s live, 200 ms stop-and-copy,
    /// 100 ms switchover; lane 1 opens at 0.5 s; the vCPUs are throttled late in the live phase.
    fn synthetic() -> Report {
        let pages = (1u64 << 30) / 4096;
        let mut timeline = Vec::new();
        let mut lanes = [0u64; 2];
        for i in 0..=36u32 {
            let t_ms = f64::from(i) * 100.0;
            let phase = match t_ms {
                t if t < 3000.0 => Phase::Live,
                t if t < 3200.0 => Phase::StopAndCopy,
                t if t < 3300.0 => Phase::Switchover,
                _ => Phase::Done,
            };
            if phase == Phase::Live || phase == Phase::StopAndCopy {
                lanes[0] += 40 << 20;
                lanes[1] += if t_ms >= 500.0 { 30 << 20 } else { 0 };
            }
            let never_sent = pages.saturating_sub(u64::from(i) * pages / 25);
            let dirty = if phase == Phase::Live {
                u64::from(i) * 900
            } else {
                0
            };
            timeline.push(Sample {
                t_ms,
                phase,
                lane_bytes: if t_ms >= 500.0 {
                    lanes.to_vec()
                } else {
                    vec![lanes[0]]
                },
                dirty_pages: dirty,
                hot_pages: dirty / 4,
                never_sent_pages: never_sent,
                throttle: if (2000.0..3000.0).contains(&t_ms) {
                    0.4
                } else {
                    0.0
                },
                vcpu_cores: (t_ms >= 2500.0).then_some(1),
                eta_ms: (3300.0 - t_ms).max(0.0),
            });
        }
        Report {
            policy: "membound".into(),
            mem_bytes: 1 << 30,
            total_ms: 3300.0,
            live_ms: 3000.0,
            downtime_ms: 300.0,
            bound_ms: Some(4000.0),
            timeline,
            ..Report::default()
        }
    }

    #[test]
    fn rates_from_cumulative_bytes() {
        let mib = 1u64 << 20;
        let r = lane_rates(&[
            sample(0.0, &[0]),
            sample(500.0, &[10 * mib]),
            sample(1000.0, &[20 * mib, 5 * mib]),
            sample(2000.0, &[20 * mib, 15 * mib]),
        ]);
        assert_eq!(r.t_s, [0.5, 1.0, 2.0]);
        assert_eq!(r.lanes, [vec![20.0, 20.0, 0.0], vec![0.0, 10.0, 10.0]]);
        assert_eq!(r.total, [20.0, 30.0, 10.0]);
    }

    #[test]
    fn rates_skip_zero_intervals_and_missing_lanes() {
        let mib = 1u64 << 20;
        let r = lane_rates(&[
            sample(0.0, &[0, 0]),
            // Same instant: skipped, its bytes count in the next interval.
            sample(0.0, &[4 * mib, 0]),
            sample(1000.0, &[8 * mib, 2 * mib]),
            // Lane 1 missing: nothing new on it; a count going down is no progress.
            sample(2000.0, &[6 * mib]),
            sample(3000.0, &[7 * mib, 3 * mib]),
        ]);
        assert_eq!(r.t_s, [1.0, 2.0, 3.0]);
        assert_eq!(r.lanes, [vec![8.0, 0.0, 1.0], vec![2.0, 0.0, 1.0]]);
        assert_eq!(lane_rates(&[]), Rates::default());
        assert!(lane_rates(&[sample(0.0, &[1])]).t_s.is_empty());
    }

    #[test]
    fn phase_spans() {
        let r = synthetic();
        assert_eq!(
            phase_span(&r.timeline, Phase::StopAndCopy),
            Some((3.0, 3.2))
        );
        assert_eq!(phase_span(&r.timeline, Phase::Switchover), Some((3.2, 3.3)));
        assert_eq!(phase_span(&r.timeline, Phase::Setup), None);
    }

    #[test]
    fn renders_an_svg() {
        let r = synthetic();
        let svg = render(&r).expect("render");
        assert!(svg.contains("<svg"), "no <svg root");
        assert!(svg.contains(&title(&r)), "no title");
        assert!(title(&r).contains("membound: total 3300 ms, downtime 300.0 ms, bound 4000 ms"));
        for text in [
            "lane 0",
            "lane 1",
            "all lanes",
            "hot (of dirty)",
            "vCPU cores",
            "switchover",
        ] {
            assert!(svg.contains(text), "no {text:?}");
        }
    }

    #[test]
    fn render_without_throttle_or_bound() {
        let mut r = synthetic();
        r.bound_ms = None;
        for s in &mut r.timeline {
            s.throttle = 0.0;
            s.vcpu_cores = None;
        }
        let svg = render(&r).expect("render");
        assert!(title(&r).contains("bound none"));
        assert!(!svg.contains("vCPU throttle"));
        r.timeline.clear();
        let e = render(&r).expect_err("empty timeline");
        assert!(e.to_string().contains("no timeline samples"), "{e}");
    }

    #[test]
    fn loads_an_object_or_a_progress_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = synthetic();
        let json = serde_json::to_string(&report).expect("json");

        let object = dir.path().join("report.json");
        std::fs::write(
            &object,
            serde_json::to_string_pretty(&report).expect("json"),
        )
        .expect("write");
        assert_eq!(load(&object).expect("object").timeline, report.timeline);

        let stream = dir.path().join("progress.jsonl");
        let progress = r#"{"progress":{"phase":"live","elapsed_ms":1.0}}"#;
        std::fs::write(&stream, format!("{progress}\n{progress}\n{json}\n\n")).expect("write");
        assert_eq!(load(&stream).expect("stream").timeline, report.timeline);

        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, "not json\n{\"progress\":{}}\n").expect("write");
        let e = load(&garbage).expect_err("garbage");
        assert!(format!("{e:#}").contains("garbage.json"), "{e:#}");
        let e = load(&dir.path().join("missing.json")).expect_err("missing");
        assert!(format!("{e:#}").contains("missing.json"), "{e:#}");
    }
}
