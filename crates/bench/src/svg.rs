//! Line charts as standalone SVG: axes with ticks, axis labels, a title and a legend;
//! one colour and marker per series. No scripts, no external fonts or styles.

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its name in the legend.
    pub name: String,
    /// `(x, y)` points, drawn in this order.
    pub points: Vec<(f64, f64)>,
    /// Dashed (reference figures from elsewhere, e.g. the seed's).
    pub dashed: bool,
}

/// A chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Title, above the plot.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Logarithmic y axis (for latencies spanning decades).
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#17becf", "#bcbd22",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "Nice" ticks covering `[lo, hi]` (1, 2 or 5 times a power of ten apart).
pub fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::EPSILON);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut ticks = Vec::new();
    let mut t = first;
    loop {
        let tick = (t / step).round() * step;
        ticks.push(tick);
        if tick >= hi - step * 1e-9 {
            return ticks;
        }
        t += step;
    }
}

/// Ticks of a log axis: 1, 2, 5 × powers of ten covering `[lo, hi]` (both > 0).
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let t = p * m;
            if t >= lo / 1.0001 && t <= hi * 1.0001 {
                ticks.push(t);
            }
        }
        p *= 10.0;
    }
    ticks
}

fn label(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Chart {
    /// The chart as an SVG document; a chart without points says so in its plot area.
    pub fn render(&self) -> String {
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || *y > 0.0))
            .collect();
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="28" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            esc(&self.title)
        );
        let (px0, px1, py0, py1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
        let _ = writeln!(
            out,
            r##"<rect x="{px0}" y="{py1}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            px1 - px0,
            py0 - py1
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (px0 + px1) / 2.0,
            H - 18.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text x="18" y="{y}" text-anchor="middle" transform="rotate(-90 18 {y})">{}</text>"#,
            esc(&self.y_label),
            y = (py0 + py1) / 2.0
        );
        if pts.is_empty() {
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{}" text-anchor="middle" fill="#888">no data</text>"##,
                (px0 + px1) / 2.0,
                (py0 + py1) / 2.0
            );
            out.push_str("</svg>\n");
            return out;
        }
        let (mut xlo, mut xhi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
            (a.min(*x), b.max(*x))
        });
        let (mut ylo, mut yhi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
            (a.min(*y), b.max(*y))
        });
        if xhi <= xlo {
            xlo -= 1.0;
            xhi += 1.0;
        }
        let yticks = if self.log_y {
            ylo = 10f64.powf(ylo.log10().floor());
            yhi = 10f64.powf(yhi.log10().ceil());
            log_ticks(ylo, yhi)
        } else {
            ylo = ylo.min(0.0);
            if yhi <= ylo {
                yhi = ylo + 1.0;
            }
            let t = linear_ticks(ylo, yhi);
            ylo = t[0];
            yhi = *t.last().expect("ticks");
            t
        };
        let xticks = linear_ticks(xlo, xhi);
        xlo = xlo.min(xticks[0]);
        xhi = xhi.max(*xticks.last().expect("ticks"));
        let sx = |x: f64| px0 + (x - xlo) / (xhi - xlo) * (px1 - px0);
        let sy = |y: f64| {
            let f = if self.log_y {
                (y.log10() - ylo.log10()) / (yhi.log10() - ylo.log10())
            } else {
                (y - ylo) / (yhi - ylo)
            };
            py0 - f * (py0 - py1)
        };
        for t in &yticks {
            let y = sy(*t);
            let _ = writeln!(
                out,
                r##"<line x1="{px0}" y1="{y:.1}" x2="{px1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                px0 - 6.0,
                y + 4.0,
                label(*t)
            );
        }
        for t in &xticks {
            let x = sx(*t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{py0}" x2="{x:.1}" y2="{}" stroke="#444"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                py0 + 5.0,
                py0 + 20.0,
                label(*t)
            );
        }
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let dash = if s.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || *y > 0.0))
                .collect();
            let path: Vec<String> = points
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            if path.len() > 1 {
                let _ = writeln!(
                    out,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                    path.join(" ")
                );
            }
            for (x, y) in &points {
                let _ = writeln!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}: {} at {}</title></circle>"#,
                    sx(*x),
                    sy(*y),
                    esc(&s.name),
                    label(*y),
                    label(*x)
                );
            }
            let ly = TOP + 8.0 + 20.0 * i as f64;
            let lx = px1 + 16.0;
            let _ = writeln!(
                out,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
                lx + 24.0,
                lx + 30.0,
                ly + 4.0,
                esc(&s.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(linear_ticks(0.0, 20.0), vec![0.0, 5.0, 10.0, 15.0, 20.0]);
        let t = linear_ticks(0.0, 1024.0);
        assert_eq!((t[0], *t.last().unwrap()), (0.0, 1200.0));
        assert_eq!(log_ticks(1.0, 1000.0).len(), 10);
        assert_eq!(log_ticks(1.0, 100.0)[..3], [1.0, 2.0, 5.0]);
    }

    #[test]
    fn a_chart_has_axes_lines_and_a_legend() {
        let chart = Chart {
            title: "Create <latency>".into(),
            x_label: "concurrency".into(),
            y_label: "ms".into(),
            log_y: true,
            series: vec![
                Series {
                    name: "cubicle p50".into(),
                    points: vec![(1.0, 5.0), (10.0, 30.0), (20.0, 60.0)],
                    dashed: false,
                },
                Series {
                    name: "seed p50".into(),
                    points: vec![(1.0, 64.5), (10.0, 168.5), (20.0, f64::NAN)],
                    dashed: true,
                },
            ],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(
            svg.matches("<circle").count(),
            5,
            "the NaN point is left out"
        );
        assert!(svg.contains("Create &lt;latency&gt;"));
        assert!(svg.contains(">cubicle p50</text>") && svg.contains(">seed p50</text>"));
        assert!(svg.contains("stroke-dasharray"));
        let empty = Chart {
            series: vec![],
            ..chart
        };
        assert!(empty.render().contains("no data"));
    }
}
