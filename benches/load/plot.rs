//! The two pictures of BENCHMARKS.md, as SVG (plotters, no font or system
//! dependencies): latency distributions of the overhead run, and upstream
//! arrivals over time of the accuracy run.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

type Panel = (String, Vec<(String, Histogram<u64>)>);

const COLORS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {e}")
}

/// Cumulative distribution of latency (log x axis, µs), one panel per
/// concurrency, one line per system.
pub fn latency_cdf(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 420 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels.len(), 1));
    for ((title, series), area) in panels.iter().zip(areas) {
        let us = |h: &Histogram<u64>, q: f64| (h.value_at_quantile(q) as f64 / 1e3).max(1.0);
        let lo = series
            .iter()
            .map(|(_, h)| us(h, 0.0))
            .fold(f64::MAX, f64::min);
        let hi = series
            .iter()
            .map(|(_, h)| us(h, 0.9999))
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("Latency distribution, {title}"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("latency (log scale)")
            .y_desc("fraction of calls ≤ x")
            .x_label_formatter(&|us| {
                if *us >= 1000.0 {
                    format!("{} ms", us / 1000.0)
                } else {
                    format!("{us} µs")
                }
            })
            .draw()
            .map_err(err)?;
        for (i, (name, h)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points: Vec<(f64, f64)> = (0..=400)
                .map(|k| {
                    // Denser towards the tail, up to p99.99.
                    let q = 1.0 - 10f64.powf(-4.0 * k as f64 / 400.0);
                    (us(h, q), q)
                })
                .collect();
            let label = format!(
                "{name}: p50 {}, p99 {}",
                crate::harness::fmt(std::time::Duration::from_nanos(h.value_at_quantile(0.5))),
                crate::harness::fmt(std::time::Duration::from_nanos(h.value_at_quantile(0.99)))
            );
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Upstream arrivals over time: a tick per arrival (top) and the gap to the
/// previous arrival (bottom) against the vendor's interval.
pub fn arrivals(
    path: &Path,
    title: &str,
    times: &[f64],
    interval_ms: f64,
    replica_of: &[usize],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(200);
    let end = times.last().copied().unwrap_or(1.0).max(1.0) * 1.02;

    let mut strip = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..1.0)
        .map_err(err)?;
    strip
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("time since the first arrival (s); one tick per request Infobip received")
        .draw()
        .map_err(err)?;
    for (i, &t) in times.iter().enumerate() {
        let color = COLORS[replica_of.get(i).copied().unwrap_or(0) % COLORS.len()];
        strip
            .draw_series(std::iter::once(PathElement::new(
                vec![(t, 0.1), (t, 0.9)],
                color.stroke_width(2),
            )))
            .map_err(err)?;
    }

    let gaps: Vec<(f64, f64)> = times
        .windows(2)
        .map(|w| (w[1], (w[1] - w[0]) * 1e3))
        .collect();
    let max_gap = gaps.iter().map(|g| g.1).fold(f64::MIN, f64::max);
    let min_gap = gaps.iter().map(|g| g.1).fold(f64::MAX, f64::min);
    let mut chart = ChartBuilder::on(&bottom)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0.0..end,
            (min_gap.min(interval_ms) - 20.0)..(max_gap.max(interval_ms) + 20.0),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since the first arrival (s)")
        .y_desc("gap to previous arrival (ms)")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, interval_ms), (end, interval_ms)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?
        .label(format!("vendor limit: {interval_ms:.0} ms"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(
            gaps.iter()
                .map(|&(t, g)| Circle::new((t, g), 3, COLORS[2].filled())),
        )
        .map_err(err)?
        .label(format!(
            "gap (smallest {min_gap:.1} ms, largest {max_gap:.1} ms)"
        ))
        .legend(|(x, y)| Circle::new((x + 10, y), 3, COLORS[2].filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
