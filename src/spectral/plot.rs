//! The density as an SVG on a log-scale y axis, as in Ghorbani et al.'s
//! figures; with exact eigenvalues, their normalised histogram overlaid.
//! Written by hand: a line, a histogram and two axes do not need a
//! plotting crate.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 440.0;
const L: f64 = 80.0;
const R: f64 = 20.0;
const T: f64 = 40.0;
const B: f64 = 60.0;

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= n as f64)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-12 * span {
        out.push(if t.abs() < 1e-12 * span { 0.0 } else { t });
        t += step;
    }
    out
}

/// SVG text of the density (and an exact histogram) over `grid`.
pub fn density_svg(title: &str, grid: &[f64], density: &[f64], exact: Option<&[f64]>) -> String {
    let (x0, x1) = (grid[0], *grid.last().unwrap());
    let peak = density.iter().cloned().fold(0.0f64, f64::max).max(1e-300);
    // Twelve decades below the peak, as far as log-scale SLQ plots are read.
    let (ly0, ly1) = ((peak * 1e-12).log10().floor(), peak.log10().ceil());
    let px = |x: f64| L + (x - x0) / (x1 - x0).max(f64::MIN_POSITIVE) * (W - L - R);
    let py = |y: f64| {
        let ly = y.max(10f64.powf(ly0)).log10();
        H - B - (ly - ly0) / (ly1 - ly0).max(1e-9) * (H - T - B)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        xml(title)
    );
    if let Some(ev) = exact {
        let bins = 100;
        let mut counts = vec![0usize; bins];
        for &l in ev {
            let b = (((l - x0) / (x1 - x0)) * bins as f64)
                .floor()
                .clamp(0.0, bins as f64 - 1.0) as usize;
            counts[b] += 1;
        }
        let width = (x1 - x0) / bins as f64;
        for (b, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let h = c as f64 / (ev.len() as f64 * width);
            let (xa, xb) = (px(x0 + b as f64 * width), px(x0 + (b + 1) as f64 * width));
            let _ = write!(
                s,
                r##"<rect x="{xa:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="#f4a582" fill-opacity="0.6"/>"##,
                py(h),
                (xb - xa).max(0.5),
                (H - B - py(h)).max(0.0)
            );
        }
    }
    let mut path = String::new();
    for (i, (x, y)) in grid.iter().zip(density).enumerate() {
        let _ = write!(
            path,
            "{}{:.2},{:.2} ",
            if i == 0 { "M" } else { "L" },
            px(*x),
            py(*y)
        );
    }
    let _ = write!(
        s,
        r##"<path d="{path}" fill="none" stroke="#2166ac" stroke-width="1.5"/>"##
    );
    // Axes, ticks and labels.
    let _ = write!(
        s,
        r#"<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>"#,
        H - B,
        W - R,
        H - B,
        H - B
    );
    for t in nice_ticks(x0, x1, 8) {
        let x = px(t);
        let _ = write!(
            s,
            r#"<line x1="{x:.2}" y1="{}" x2="{x:.2}" y2="{}" stroke="black"/><text x="{x:.2}" y="{}" text-anchor="middle">{}</text>"#,
            H - B,
            H - B + 5.0,
            H - B + 20.0,
            fmt(t)
        );
    }
    let mut d = ly0;
    let step = ((ly1 - ly0) / 6.0).ceil().max(1.0);
    while d <= ly1 {
        let y = py(10f64.powf(d));
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{y:.2}" x2="{L}" y2="{y:.2}" stroke="black"/><text x="{}" y="{:.2}" text-anchor="end">1e{d}</text>"#,
            L - 5.0,
            L - 8.0,
            y + 4.0
        );
        d += step;
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">eigenvalue</text><text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">density (log scale)</text></svg>"#,
        (L + W - R) / 2.0,
        H - 15.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    s
}

fn fmt(t: f64) -> String {
    if t == 0.0 {
        "0".into()
    } else if t.abs() >= 1e4 || t.abs() < 1e-3 {
        format!("{t:.1e}")
    } else {
        format!("{}", (t * 1e6).round() / 1e6)
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
