//! The density as an SVG on a log-scale y axis, as in Ghorbani et al.'s
//! figures; with exact eigenvalues, their normalised histogram overlaid;
//! with a standard error per grid point, a shaded band of ±2 of them.
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

/// SVG text of the density (and an exact histogram, and a band of ±2
/// standard errors `stderr`) over `grid`. The band's lower edge at or
/// below zero is drawn at the axis' floor (a log scale has no zero).
pub fn density_svg(
    title: &str,
    grid: &[f64],
    density: &[f64],
    exact: Option<&[f64]>,
    stderr: Option<&[f64]>,
) -> String {
    let (x0, x1) = (grid[0], *grid.last().unwrap());
    let peak = density.iter().cloned().fold(0.0f64, f64::max).max(1e-300);
    // The band's top edge fits too (a density's own peak sets the floor).
    let top = match stderr {
        Some(se) => density
            .iter()
            .zip(se)
            .map(|(d, e)| d + 2.0 * e)
            .fold(peak, f64::max),
        None => peak,
    };
    // Twelve decades below the peak, as far as log-scale SLQ plots are read.
    let (ly0, ly1) = ((peak * 1e-12).log10().floor(), top.log10().ceil());
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
    if let Some(se) = stderr {
        let mut band = String::new();
        let upper = grid
            .iter()
            .zip(density)
            .zip(se)
            .map(|((x, y), e)| (x, y + 2.0 * e));
        let lower = grid
            .iter()
            .zip(density)
            .zip(se)
            .map(|((x, y), e)| (x, y - 2.0 * e));
        for (i, (x, y)) in upper.chain(lower.rev()).enumerate() {
            let _ = write!(
                band,
                "{}{:.2},{:.2} ",
                if i == 0 { "M" } else { "L" },
                px(*x),
                py(y)
            );
        }
        let _ = write!(
            s,
            r##"<path d="{band}Z" fill="#92c5de" fill-opacity="0.6" stroke="none"><title>±2 standard errors over the runs</title></path>"##
        );
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

pub(crate) fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Colours of successive series (ColorBrewer's Dark2 and Set1, then again).
const PALETTE: [&str; 10] = [
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#377eb8",
    "#e41a1c", "#666666",
];

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// One labelled density on its own grid.
pub struct DensitySeries<'a> {
    pub label: String,
    pub grid: &'a [f64],
    pub density: &'a [f64],
}

/// Several densities (successive epochs of a run) on one log-scale figure:
/// the x axis spans every grid, the y axis twelve decades below the
/// highest peak, one colour per series with a legend.
pub fn densities_svg(title: &str, series: &[DensitySeries]) -> String {
    let mut x0 = f64::INFINITY;
    let mut x1 = f64::NEG_INFINITY;
    let mut peak: f64 = 1e-300;
    for d in series {
        if let (Some(a), Some(b)) = (d.grid.first(), d.grid.last()) {
            x0 = x0.min(*a);
            x1 = x1.max(*b);
        }
        peak = d.density.iter().cloned().fold(peak, f64::max);
    }
    if !(x0.is_finite() && x1.is_finite()) {
        (x0, x1) = (0.0, 1.0);
    }
    let (ly0, ly1) = ((peak * 1e-12).log10().floor(), peak.log10().ceil());
    let px = |x: f64| L + (x - x0) / (x1 - x0).max(f64::MIN_POSITIVE) * (W - L - R - 110.0);
    let py = |y: f64| {
        let ly = y.max(10f64.powf(ly0)).log10();
        H - B - (ly - ly0) / (ly1 - ly0).max(1e-9) * (H - T - B)
    };
    let mut s = header(title);
    for (i, d) in series.iter().enumerate() {
        let mut path = String::new();
        for (j, (x, y)) in d.grid.iter().zip(d.density).enumerate() {
            let _ = write!(
                path,
                "{}{:.2},{:.2} ",
                if j == 0 { "M" } else { "L" },
                px(*x),
                py(*y)
            );
        }
        let _ = write!(
            s,
            r#"<path d="{path}" fill="none" stroke="{}" stroke-width="1.2"/>"#,
            colour(i)
        );
        legend(
            &mut s,
            W - R - 100.0,
            T + 14.0 * i as f64,
            colour(i),
            &d.label,
        );
    }
    let xr = W - R - 110.0;
    let _ = write!(
        s,
        r#"<line x1="{L}" y1="{}" x2="{xr}" y2="{}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>"#,
        H - B,
        H - B,
        H - B
    );
    for t in nice_ticks(x0, x1, 7) {
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
        (L + xr) / 2.0,
        H - 15.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    s
}

/// A labelled line of (x, y) points; non-finite points are left out.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of [`panels_svg`]: its y label and lines.
pub struct Panel {
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Panels stacked vertically over a shared x axis (epochs), linear axes,
/// markers at the points, a legend per panel.
pub fn panels_svg(title: &str, x_label: &str, panels: &[Panel]) -> String {
    let ph = 200.0;
    let gap = 40.0;
    let height = T + panels.len() as f64 * (ph + gap) + 30.0;
    let xr = W - R - 150.0;
    let pts = || {
        panels
            .iter()
            .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter()))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut x0, mut x1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    if !(x0.is_finite() && x1.is_finite()) {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let px = |x: f64| L + (x - x0) / (x1 - x0) * (xr - L);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        xml(title)
    );
    for (pi, p) in panels.iter().enumerate() {
        let top = T + pi as f64 * (ph + gap);
        let bottom = top + ph;
        let ys = p
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(_, y)| *y);
        let (mut y0, mut y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
        if !(y0.is_finite() && y1.is_finite()) {
            (y0, y1) = (0.0, 1.0);
        }
        let pad = 0.05 * (y1 - y0).abs().max(1e-12 * y1.abs().max(1e-300));
        (y0, y1) = (y0 - pad, y1 + pad);
        let py = |y: f64| bottom - (y - y0) / (y1 - y0) * ph;
        for (si, ser) in p.series.iter().enumerate() {
            let c = colour(si);
            let mut path = String::new();
            let mut first = true;
            for (x, y) in ser
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
            {
                let _ = write!(
                    path,
                    "{}{:.2},{:.2} ",
                    if first { "M" } else { "L" },
                    px(*x),
                    py(*y)
                );
                first = false;
                let _ = write!(
                    s,
                    r#"<circle cx="{:.2}" cy="{:.2}" r="2.5" fill="{c}"/>"#,
                    px(*x),
                    py(*y)
                );
            }
            let _ = write!(
                s,
                r#"<path d="{path}" fill="none" stroke="{c}" stroke-width="1.5"/>"#
            );
            legend(&mut s, xr + 20.0, top + 14.0 * si as f64, c, &ser.label);
        }
        let _ = write!(
            s,
            r#"<line x1="{L}" y1="{bottom}" x2="{xr}" y2="{bottom}" stroke="black"/><line x1="{L}" y1="{top}" x2="{L}" y2="{bottom}" stroke="black"/>"#
        );
        for t in nice_ticks(y0, y1, 5) {
            let y = py(t);
            let _ = write!(
                s,
                r#"<line x1="{}" y1="{y:.2}" x2="{L}" y2="{y:.2}" stroke="black"/><text x="{}" y="{:.2}" text-anchor="end">{}</text>"#,
                L - 5.0,
                L - 8.0,
                y + 4.0,
                fmt(t)
            );
        }
        // Whole epochs: no ticks closer than 1 apart.
        let xticks = 8.min((x1 - x0).ceil().max(1.0) as usize);
        for t in nice_ticks(x0, x1, xticks) {
            let x = px(t);
            let _ = write!(
                s,
                r#"<line x1="{x:.2}" y1="{bottom}" x2="{x:.2}" y2="{}" stroke="black"/><text x="{x:.2}" y="{}" text-anchor="middle">{}</text>"#,
                bottom + 5.0,
                bottom + 18.0,
                fmt(t)
            );
        }
        let mid = (top + bottom) / 2.0;
        let _ = write!(
            s,
            r#"<text x="18" y="{mid}" text-anchor="middle" transform="rotate(-90 18 {mid})">{}</text>"#,
            xml(&p.y_label)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text></svg>"#,
        (L + xr) / 2.0,
        height - 8.0,
        xml(x_label)
    );
    s
}

fn header(title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        xml(title)
    )
}

fn legend(s: &mut String, x: f64, y: f64, colour: &str, label: &str) {
    let _ = write!(
        s,
        r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
        x + 16.0,
        x + 20.0,
        y + 4.0,
        xml(label)
    );
}
