//! Charts drawn on the server as SVG (no script): a line over time with its axis labels, and
//! a text summary of the same numbers for screen readers.

use maud::{Markup, html};

const W: f64 = 320.0;
const H: f64 = 140.0;
/// Room for the labels left and below.
const LEFT: f64 = 62.0;
const BOTTOM: f64 = 18.0;

/// A number with a unit and an SI prefix, e.g. "1.2 M".
pub fn si(v: f64, unit: &str) -> String {
    let (d, p) = if v >= 1e9 {
        (1e9, "G")
    } else if v >= 1e6 {
        (1e6, "M")
    } else if v >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let x = v / d;
    if x >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0} {p}{unit}")
    } else {
        format!("{x:.1} {p}{unit}")
    }
}

/// A line chart of `points` (Unix seconds, value) up to `now`: over the last `span` seconds,
/// or since the first point when that is more recent (a broker that just started), at least
/// a minute.
pub fn line(
    id: &str,
    title: &str,
    unit: &str,
    points: &[(u64, f64)],
    now: u64,
    span: u64,
) -> Markup {
    let span = points
        .first()
        .map_or(span, |p| now.saturating_sub(p.0).div_ceil(60).max(1) * 60)
        .min(span);
    let max = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
    // A round top for the axis: 1, 2 or 5 times a power of ten.
    let top = if max <= 0.0 {
        1.0
    } else {
        let p = 10f64.powf(max.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * p)
            .find(|t| *t >= max)
            .unwrap_or(10.0 * p)
    };
    let start = now.saturating_sub(span);
    let x = |t: u64| LEFT + (t.saturating_sub(start) as f64 / span.max(1) as f64) * (W - LEFT);
    let y = |v: f64| (H - BOTTOM) - (v / top) * (H - BOTTOM - 8.0);
    let path: String = points
        .iter()
        .filter(|p| p.0 >= start)
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{}{:.1},{:.1}",
                if i == 0 { "M" } else { " L" },
                x(p.0),
                y(p.1)
            )
        })
        .collect();
    let last = points.last().map(|p| p.1).unwrap_or(0.0);
    let summary = format!(
        "{title}: now {}, highest {} over the last {} min ({} samples)",
        si(last, unit),
        si(max, unit),
        span / 60,
        points.len()
    );
    html! {
        figure.chart id=(id) {
            figcaption { (title) " — now " strong { (si(last, unit)) } }
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(summary) {
                title { (summary) }
                line.axis x1=(LEFT) y1=(H - BOTTOM) x2=(W) y2=(H - BOTTOM) {}
                line.grid x1=(LEFT) y1=(y(top)) x2=(W) y2=(y(top)) {}
                line.grid x1=(LEFT) y1=(y(top / 2.0)) x2=(W) y2=(y(top / 2.0)) {}
                text.label x=(LEFT - 4.0) y=(y(top) + 4.0) text-anchor="end" { (si(top, unit)) }
                text.label x=(LEFT - 4.0) y=(y(top / 2.0) + 4.0) text-anchor="end" { (si(top / 2.0, unit)) }
                text.label x=(LEFT - 4.0) y=(H - BOTTOM + 4.0) text-anchor="end" { "0" }
                text.label x=(LEFT) y=(H - 4.0) { (format!("-{} min", span / 60)) }
                text.label x=(W) y=(H - 4.0) text-anchor="end" { "now" }
                @if !path.is_empty() {
                    path.series d=(path) {}
                }
            }
            @if points.is_empty() {
                p.muted { "No samples yet (one every few seconds)." }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_prefixes() {
        assert_eq!(si(0.0, "/s"), "0 /s");
        assert_eq!(si(12.5, "/s"), "12.5 /s");
        assert_eq!(si(1500.0, "B/s"), "1.5 kB/s");
        assert_eq!(si(2.5e9, "bit/s"), "2.5 Gbit/s");
        assert_eq!(si(250e6, "B/s"), "250 MB/s");
        assert_eq!(si(10e3, "bit/s"), "10 kbit/s");
    }

    #[test]
    fn a_line_has_a_path_through_its_points_and_a_text_summary() {
        let pts = [(100, 1.0), (105, 4.0), (110, 2.0)];
        let svg = line("c", "Flows", "/s", &pts, 110, 3600).into_string();
        assert!(svg.contains("<path class=\"series\" d=\"M"), "{svg}");
        assert_eq!(svg.matches(" L").count(), 2, "{svg}");
        assert!(svg.contains("now 2 /s, highest 4 /s"), "{svg}");
        // The axis top is rounded up (5 for a highest of 4).
        assert!(svg.contains(">5 /s<"), "{svg}");
        let empty = line("c", "Flows", "/s", &[], 110, 3600).into_string();
        assert!(!empty.contains("<path") && empty.contains("No samples yet"));
        // Text is escaped.
        let evil = line("c", "<script>", "/s", &[], 1, 60).into_string();
        assert!(!evil.contains("<script>"));
    }
}
