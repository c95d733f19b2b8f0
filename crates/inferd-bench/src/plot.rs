//! PNG plots of a sweep: throughput against latency, and latency
//! distributions. Text is drawn with DejaVu Sans compiled into the binary.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{Figure, Run, quantile};

/// Every plot's size in pixels.
pub const SIZE: (u32, u32) = (1200, 500);
const FONT: &str = "sans-serif";

fn register_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .map_err(|_| anyhow::anyhow!("the embedded font did not load"));
    });
    result
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// A run's name in a legend: its label, if several labels are plotted, and its load.
fn run_name(r: &Run, labelled: bool) -> String {
    match (&r.label, labelled) {
        (Some(l), true) => format!("{l} {}", r.load.name()),
        _ => r.load.name(),
    }
}

/// Upper end of an axis holding `values`, with some room above.
fn top(values: impl Iterator<Item = f64>) -> f64 {
    let m = values.fold(0.0f64, f64::max);
    if m > 0.0 { m * 1.15 } else { 1.0 }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A titled panel with its grid and axis names.
fn axes<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    (xmax, ymax): (f64, f64),
    (xdesc, ydesc): (&str, &str),
) -> anyhow::Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(xdesc)
        .y_desc(ydesc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// A named line in the `i`th colour of the palette.
fn line(
    chart: &mut Chart<'_, '_>,
    i: usize,
    name: String,
    points: Vec<(f64, f64)>,
) -> anyhow::Result<RGBAColor> {
    let color = Palette99::pick(i).to_rgba();
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))
        .map_err(err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(color)
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, at: SeriesLabelPosition) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// One panel: each series against output tokens/s, one point per run.
fn panel(area: &Area<'_>, title: &str, runs: &[Run], series: &[Figure]) -> anyhow::Result<()> {
    let xmax = top(runs.iter().map(|r| r.throughput.output_tokens_per_s));
    let ymax = top(runs.iter().flat_map(|r| series.iter().map(move |(_, f)| f(r))));
    let mut chart = axes(area, title, (xmax, ymax), ("output tokens/s", "milliseconds"))?;
    // One line per series and label (runs of several servers compared).
    let mut labels: Vec<&Option<String>> = Vec::new();
    for r in runs {
        if !labels.contains(&&r.label) {
            labels.push(&r.label);
        }
    }
    for (g, label) in labels.iter().enumerate() {
        let group: Vec<&Run> = runs.iter().filter(|r| &&r.label == label).collect();
        for (i, (name, f)) in series.iter().enumerate() {
            let points: Vec<(f64, f64)> =
                group.iter().map(|r| (r.throughput.output_tokens_per_s, f(r))).collect();
            let name = match (label, labels.len()) {
                (Some(l), 2..) => format!("{l} {name}"),
                _ => name.to_string(),
            };
            let color = line(&mut chart, g * series.len() + i, name, points.clone())?;
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(err)?;
        }
        // Name each point of the first series by its load.
        if let Some((_, f)) = series.first() {
            chart
                .draw_series(
                    group.iter().map(|r| {
                        Text::new(r.load.name(), (r.throughput.output_tokens_per_s, f(r)), (FONT, 13))
                    }),
                )
                .map_err(err)?;
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// One panel of empirical CDFs, one line per run.
fn cdf_panel(
    area: &Area<'_>,
    title: &str,
    runs: &[Run],
    samples: fn(&Run) -> &Vec<f64>,
) -> anyhow::Result<()> {
    let sorted: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| {
            let mut v = samples(r).clone();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    // Up to the 99.5th percentile: one outlier would squash every curve.
    let xmax = top(sorted.iter().map(|v| quantile(v, 0.995)));
    let mut chart = axes(area, title, (xmax, 1.0), ("milliseconds", "fraction at or below"))?;
    let labelled = runs.iter().any(|r| r.label != runs[0].label);
    for (i, (run, v)) in runs.iter().zip(&sorted).enumerate() {
        if v.is_empty() {
            continue;
        }
        let n = v.len() as f64;
        // At most ~600 points a line: the plot is 600 pixels wide.
        let step = (v.len() / 600).max(1);
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(j, _)| j % step == 0 || *j == v.len() - 1)
            .map(|(j, &x)| (x.min(xmax), (j + 1) as f64 / n))
            .collect();
        line(&mut chart, i, run_name(run, labelled), points)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// Writes `throughput_latency.png` and `latency_distribution.png` into
/// `dir` and returns their paths.
pub fn write(dir: &Path, runs: &[Run]) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(!runs.is_empty(), "nothing to plot");
    register_font()?;
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let tl = dir.join("throughput_latency.png");
    {
        let root = BitMapBackend::new(&tl, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(SIZE.0 / 2);
        panel(
            &left,
            "Time to first token",
            runs,
            &[("TTFT p50", |r| r.ttft_ms.p50), ("TTFT p99", |r| r.ttft_ms.p99)],
        )?;
        panel(
            &right,
            "Inter-token latency",
            runs,
            &[("ITL p50", |r| r.itl_ms.p50), ("ITL p99", |r| r.itl_ms.p99), ("TPOT p50", |r| r.tpot_ms.p50)],
        )?;
        root.present().map_err(err)?;
    }
    let dist = dir.join("latency_distribution.png");
    {
        let root = BitMapBackend::new(&dist, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(SIZE.0 / 2);
        cdf_panel(&left, "Time to first token (CDF)", runs, |r| &r.samples.ttft_ms)?;
        cdf_panel(&right, "Inter-token latency (CDF)", runs, |r| &r.samples.itl_ms)?;
        root.present().map_err(err)?;
    }
    Ok(vec![tl, dist])
}
