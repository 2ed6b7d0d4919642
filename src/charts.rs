//! The ramp report's charts, drawn by plotters as SVG: pure data in, markup out, so that the
//! HTML report is one self-contained file.

use plotters::prelude::*;

/// One chart: x values (fleet sizes) and named series, with optional horizontal SLO line.
/// A series value of None is no point at all (a step where nothing succeeded has no
/// latency, which is not a latency of 0). Points of `search` steps are drawn as hollow
/// triangles, the planned steps' as dots; lines join the points in fleet order.
pub struct Chart<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub x: &'a [f64],
    pub series: Vec<(&'a str, Vec<Option<f64>>)>,
    /// Which x values were search steps (empty: none were).
    pub search: &'a [bool],
    pub slo: Option<(&'a str, f64)>,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Renders a chart as an SVG document; an error string when plotters cannot draw it.
pub fn svg(chart: &Chart<'_>) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (720, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        // From 0, with room on the right, so that a single step still reads as a point.
        let x_max = chart.x.iter().copied().fold(1.0, f64::max) * 1.1;
        let mut y_max = chart
            .series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .fold(0.0, f64::max);
        if let Some((_, y)) = chart.slo {
            y_max = y_max.max(y);
        }
        let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
        let mut c = ChartBuilder::on(&root)
            .caption(chart.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc("vehicles")
            .y_desc(chart.y_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, ys)) in chart.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let mut pts: Vec<(f64, f64, bool)> = chart
                .x
                .iter()
                .zip(ys)
                .enumerate()
                .filter_map(|(k, (x, y))| Some((*x, (*y)?, chart.search.get(k) == Some(&true))))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            c.draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
            c.draw_series(
                pts.iter()
                    .filter(|p| !p.2)
                    .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
            )
            .map_err(|e| e.to_string())?;
            c.draw_series(
                pts.iter()
                    .filter(|p| p.2)
                    .map(|p| TriangleMarker::new((p.0, p.1), 5, color.stroke_width(1))),
            )
            .map_err(|e| e.to_string())?;
        }
        if let Some((name, y)) = chart.slo {
            c.draw_series(LineSeries::new(
                vec![(0.0, y), (x_max, y)],
                RED.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        }
        c.configure_series_labels()
            .position(legend_corner(chart, x_max, y_max))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Where the legend covers the least: of six places (upper, middle and lower, at the left
/// and the right, each a third of the height and half the width), the one with the fewest
/// points and stretches of line in it (lines sampled ten times between points).
fn legend_corner(chart: &Chart<'_>, x_max: f64, y_max: f64) -> SeriesLabelPosition {
    let mut marks: Vec<(f64, f64)> = Vec::new();
    for (_, ys) in &chart.series {
        let mut pts: Vec<(f64, f64)> = chart
            .x
            .iter()
            .zip(ys)
            .filter_map(|(x, y)| Some((x / x_max, (*y)? / y_max)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        marks.extend(pts.iter().copied());
        for w in pts.windows(2) {
            marks.extend((1..10).map(|k| {
                let f = f64::from(k) / 10.0;
                (
                    w[0].0 + (w[1].0 - w[0].0) * f,
                    w[0].1 + (w[1].1 - w[0].1) * f,
                )
            }));
        }
    }
    if let Some((_, y)) = chart.slo {
        marks.extend((0..=10).map(|k| (f64::from(k) / 10.0, y / y_max)));
    }
    let places = [
        (SeriesLabelPosition::UpperRight, true, 2),
        (SeriesLabelPosition::UpperLeft, false, 2),
        (SeriesLabelPosition::MiddleRight, true, 1),
        (SeriesLabelPosition::MiddleLeft, false, 1),
        (SeriesLabelPosition::LowerRight, true, 0),
        (SeriesLabelPosition::LowerLeft, false, 0),
    ];
    let covered = |right: bool, band: i32| {
        marks
            .iter()
            .filter(|(x, y)| (*x > 0.5) == right && ((y * 3.0).floor() as i32).clamp(0, 2) == band)
            .count()
    };
    places
        .into_iter()
        .min_by_key(|(_, right, band)| covered(*right, *band))
        .map(|(p, _, _)| p)
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_series_and_slo() {
        let x = [50.0, 100.0, 200.0];
        let s = svg(&Chart {
            title: "throughput",
            y_label: "msg/s",
            x: &x,
            series: vec![
                ("expected", vec![Some(41.0), Some(83.0), Some(166.0)]),
                ("accepted", vec![Some(41.0), Some(83.0), Some(120.0)]),
            ],
            search: &[],
            slo: Some(("SLO", 150.0)),
        })
        .unwrap();
        assert!(s.starts_with("<svg"));
        assert!(s.contains("throughput") && s.contains("accepted") && s.contains("SLO"));
        assert_eq!(s.matches("<circle").count(), 6);
    }

    #[test]
    fn missing_values_are_no_points_and_search_steps_are_triangles() {
        let x = [400.0, 200.0, 100.0];
        let s = svg(&Chart {
            title: "latency",
            y_label: "ms",
            x: &x,
            series: vec![("p95", vec![None, Some(30.0), Some(4.0)])],
            search: &[false, true, true],
            slo: None,
        })
        .unwrap();
        assert_eq!(s.matches("<circle").count(), 0, "{s}");
        assert_eq!(s.matches("<polygon").count(), 2, "{s}");
        // One step alone still draws its point.
        let one = svg(&Chart {
            title: "one",
            y_label: "ms",
            x: &[50.0],
            series: vec![("p95", vec![Some(3.0)])],
            search: &[false],
            slo: None,
        })
        .unwrap();
        assert_eq!(one.matches("<circle").count(), 1);
    }

    #[test]
    fn the_legend_goes_where_no_point_is() {
        let x = [10.0, 50.0, 100.0];
        let high = Chart {
            title: "success",
            y_label: "%",
            x: &x,
            series: vec![("success", vec![Some(100.0), Some(100.0), Some(100.0)])],
            search: &[],
            slo: Some(("99 %", 99.0)),
        };
        assert!(matches!(
            legend_corner(&high, 110.0, 110.0),
            SeriesLabelPosition::MiddleRight
        ));
        let rising = Chart {
            series: vec![("cpu", vec![Some(1.0), Some(50.0), Some(100.0)])],
            slo: None,
            ..high
        };
        assert!(matches!(
            legend_corner(&rising, 110.0, 110.0),
            SeriesLabelPosition::UpperLeft
        ));
    }
}
