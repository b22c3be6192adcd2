//! `--chart FILE.svg`: latency percentiles (top) and throughput (bottom) over the run, per
//! interval, drawn with plotters' SVG backend (text as SVG text: no font files needed).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::stats::SeriesPoint;

/// Reads one percentile.
type Pick = fn(&crate::stats::Percentiles) -> f64;

/// Chart size in pixels.
pub const CHART_SIZE: (u32, u32) = (1000, 700);

/// Draws `series` to `path`. `what` names the throughput (e.g. "delivered msgs/s") and
/// `latency` the latency (e.g. "send → deliver").
pub fn draw(
    path: &Path,
    title: &str,
    series: &[SeriesPoint],
    what: &str,
    latency: &str,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("chart {}: {e}", path.display());
    let root = SVGBackend::new(path, CHART_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(CHART_SIZE.1 * 55 / 100);
    let t_max = series.last().map_or(1.0, |p| p.t_s).max(1.0);

    let lat_max = series
        .iter()
        .filter_map(|p| p.latency_ms.map(|l| l.max))
        .fold(0.0f64, f64::max)
        .max(0.01);
    let lat_min = series
        .iter()
        .filter_map(|p| p.latency_ms.map(|l| l.p50))
        .fold(f64::INFINITY, f64::min)
        .clamp(0.002, lat_max)
        / 2.0;
    let mut chart = ChartBuilder::on(&top)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, (lat_min..lat_max * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(format!("latency ms ({latency})"))
        .draw()
        .map_err(|e| err(&e))?;
    let lines: [(&str, RGBColor, Pick); 4] = [
        ("p50", BLUE, |l| l.p50),
        ("p99", GREEN, |l| l.p99),
        ("p999", MAGENTA, |l| l.p999),
        ("max", RED, |l| l.max),
    ];
    for (name, color, f) in lines {
        let points: Vec<(f64, f64)> = series
            .iter()
            .filter_map(|p| p.latency_ms.as_ref().map(|l| (p.t_s, f(l).max(0.001))))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;

    let rate_max = series
        .iter()
        .map(|p| p.delivered_per_s.max(p.acked_per_s))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let mut chart = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..rate_max * 1.1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(what)
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            series.iter().map(|p| (p.t_s, p.delivered_per_s)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(what)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if series.iter().any(|p| p.acked_per_s > 0.0) {
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|p| (p.t_s, p.acked_per_s)),
                GREEN.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label("SendAcks/s")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
