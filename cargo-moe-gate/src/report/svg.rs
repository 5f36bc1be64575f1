//! `layers.svg`: one chart per per-layer criterion, one line per prompt, the threshold in red. Cosines are
//! drawn as `1 - cosine` and error metrics on a log axis, so that "how many digits agree" reads off the
//! plot; counts stay linear.

use moe_contracts::Metric;
use plotters::prelude::*;

use super::{GateReport, LayerTable};
use crate::error::GateError;

/// Values at or below this are drawn at the floor of a log axis (bit-identical layers have error 0).
const LOG_FLOOR: f64 = 1e-16;
/// Width of the picture, pixels.
const WIDTH: u32 = 960;
/// Height of each criterion's chart, pixels.
const CHART_HEIGHT: u32 = 360;

/// How a metric is put on the y axis.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Axis {
    /// `1 - cosine`, log scale.
    OneMinus,
    /// The value, log scale.
    Log,
    /// The value, linear.
    Linear,
}

impl Axis {
    fn for_metric(metric: Metric) -> Self {
        match metric {
            Metric::Cosine => Axis::OneMinus,
            Metric::Nmse | Metric::MaxAbs | Metric::Kld => Axis::Log,
            Metric::ErrorRatio | Metric::Argmax | Metric::TopkSet | Metric::Bitwise | Metric::Greedy => {
                Axis::Linear
            }
        }
    }

    fn map(self, v: f64) -> f64 {
        match self {
            Axis::OneMinus => (1.0 - v).max(LOG_FLOOR),
            Axis::Log => v.max(LOG_FLOOR),
            Axis::Linear => v,
        }
    }

    fn label(self, metric: Metric) -> String {
        match self {
            Axis::OneMinus => format!("1 - {metric} (log)"),
            Axis::Log => format!("{metric} (log)"),
            Axis::Linear => metric.as_str().to_string(),
        }
    }
}

/// The SVG document (a note when no criterion is per layer).
pub fn render(report: &GateReport) -> Result<String, GateError> {
    let mut svg = String::new();
    let n = report.layers.len().max(1);
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, CHART_HEIGHT * n as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        if report.layers.is_empty() {
            root.draw(&Text::new(
                "no per-layer criterion in this run",
                (20, 40),
                ("sans-serif", 18).into_font(),
            ))
            .map_err(plot_err)?;
        }
        let areas = root.split_evenly((n, 1));
        for (table, area) in report.layers.iter().zip(areas.iter()) {
            chart(&report.contract.id, table, area)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn chart(
    contract: &str,
    table: &LayerTable,
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
) -> Result<(), GateError> {
    let axis = Axis::for_metric(table.metric);
    let prompts: Vec<&String> = {
        let mut p: Vec<&String> = table.rows.iter().flat_map(|r| r.values.keys()).collect();
        p.sort();
        p.dedup();
        p
    };
    let max_layer = table.rows.iter().map(|r| r.layer).max().unwrap_or(0);
    let finite: Vec<f64> = table
        .rows
        .iter()
        .flat_map(|r| r.values.values().map(|&v| axis.map(v)))
        .chain(table.threshold.map(|t| axis.map(t)))
        .filter(|v| v.is_finite())
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let caption = format!("{contract}::{} — {} per layer", table.criterion, table.metric);
    let x_range = 0f64..(max_layer.max(1) as f64);
    // One tick per layer up to 24 layers (48-layer models get every other one).
    let x_labels = (max_layer + 1).min(24);
    let mut builder = ChartBuilder::on(area);
    builder.caption(caption, ("sans-serif", 16)).margin(12).x_label_area_size(36).y_label_area_size(72);
    let series: Vec<(&String, Vec<(f64, f64)>)> = prompts
        .iter()
        .map(|p| {
            let pts = table
                .rows
                .iter()
                .filter_map(|r| r.values.get(*p).map(|&v| (r.layer as f64, axis.map(v))))
                .filter(|(_, y)| y.is_finite())
                .collect();
            (*p, pts)
        })
        .collect();
    let threshold = table.threshold.map(|t| axis.map(t));
    match axis {
        Axis::OneMinus | Axis::Log => {
            let (lo, hi) = (lo.max(LOG_FLOOR) / 2.0, (hi * 2.0).max(LOG_FLOOR * 10.0));
            let mut chart =
                builder.build_cartesian_2d(x_range.clone(), (lo..hi).log_scale()).map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_labels(x_labels)
                .x_label_formatter(&layer_label)
                .x_desc("layer")
                .y_desc(axis.label(table.metric))
                .y_label_formatter(&|v| format!("{v:.0e}"))
                .draw()
                .map_err(plot_err)?;
            draw_series(&mut chart, &series, threshold, &x_range)?;
        }
        Axis::Linear => {
            let pad = ((hi - lo).abs() * 0.1).max(0.5);
            let mut chart =
                builder.build_cartesian_2d(x_range.clone(), (lo - pad)..(hi + pad)).map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_labels(x_labels)
                .x_label_formatter(&layer_label)
                .x_desc("layer")
                .y_desc(axis.label(table.metric))
                .draw()
                .map_err(plot_err)?;
            draw_series(&mut chart, &series, threshold, &x_range)?;
        }
    }
    Ok(())
}

fn draw_series<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    series: &[(&String, Vec<(f64, f64)>)],
    threshold: Option<f64>,
    x_range: &std::ops::Range<f64>,
) -> Result<(), GateError>
where
    Y: Ranged<ValueType = f64>,
{
    let show_legend = series.len() <= 12;
    for (i, (prompt, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let drawn = chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)).point_size(3))
            .map_err(plot_err)?;
        if show_legend {
            drawn
                .label(prompt.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
    }
    if let Some(t) = threshold.filter(|t| t.is_finite()) {
        chart
            .draw_series(LineSeries::new(vec![(x_range.start, t), (x_range.end, t)], RED.stroke_width(1)))
            .map_err(plot_err)?
            .label("threshold")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_err)
}

/// Layers are whole numbers; ticks between them get no label.
fn layer_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> GateError {
    GateError::write("layers.svg", format!("plotting failed: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::super::sample;
    use super::*;

    #[test]
    fn svg_draws_one_line_per_prompt_and_the_threshold() {
        let svg = render(&sample::report()).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.contains("c-v1::HID — cosine per layer"));
        let texts: Vec<&str> = svg.split("<text").skip(1).filter_map(|t| t.split('>').nth(1)).collect();
        let has = |label: &str| texts.iter().any(|t| t.trim_start().starts_with(label));
        assert!(has("p_a") && has("p_b") && has("threshold"), "{texts:?}");
        assert!(svg.contains("1 - cosine (log)"));
        assert!(svg.matches("<polyline").count() >= 3, "two prompts and the threshold");
    }

    #[test]
    fn axis_maps_values() {
        assert_eq!(Axis::for_metric(Metric::Cosine).map(1.0), LOG_FLOOR);
        assert!((Axis::for_metric(Metric::Cosine).map(0.999) - 1e-3).abs() < 1e-12);
        assert_eq!(Axis::for_metric(Metric::Nmse).map(0.0), LOG_FLOOR);
        assert_eq!(Axis::for_metric(Metric::TopkSet).map(3.0), 3.0);
    }

    #[test]
    fn empty_report_still_renders() {
        let mut r = sample::report();
        r.layers.clear();
        assert!(render(&r).unwrap().contains("no per-layer criterion"));
    }
}
