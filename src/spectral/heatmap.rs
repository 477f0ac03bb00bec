//! A labelled square heat map as SVG (the Jensen–Shannon distances
//! between block densities): one cell per pair, white (0) to dark red
//! (the scale's top), grey where undefined, the value printed in each cell
//! while cells are large enough to read, a colour bar beside.

use crate::spectral::plot::xml;
use std::fmt::Write;

/// White → yellow → red → dark red over t in [0, 1].
fn ramp(t: f64) -> String {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let stops = [
        (0.0, [255.0, 255.0, 255.0]),
        (0.33, [254.0, 217.0, 118.0]),
        (0.66, [240.0, 59.0, 32.0]),
        (1.0, [128.0, 0.0, 38.0]),
    ];
    let mut c = stops[3].1;
    for w in stops.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if t <= b {
            let u = (t - a) / (b - a);
            c = [0, 1, 2].map(|i| ca[i] + u * (cb[i] - ca[i]));
            break;
        }
    }
    format!(
        "#{:02x}{:02x}{:02x}",
        c[0].round() as u8,
        c[1].round() as u8,
        c[2].round() as u8
    )
}

/// The matrix `m` (k×k, None where undefined) with `labels` on both axes,
/// coloured over [0, `top`].
pub fn heatmap_svg(title: &str, labels: &[String], m: &[Vec<Option<f64>>], top: f64) -> String {
    let k = labels.len().max(1);
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as f64;
    let margin = (longest * 6.5 + 12.0).clamp(60.0, 360.0);
    let cell = (640.0 / k as f64).clamp(6.0, 48.0);
    let side = cell * k as f64;
    let (x0, y0) = (margin, 40.0);
    let bar_x = x0 + side + 24.0;
    let w = bar_x + 90.0;
    let h = y0 + side + margin;
    let font = (cell * 0.6).clamp(5.0, 12.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="{font}"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        xml(title)
    );
    for (i, row) in m.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let (x, y) = (x0 + j as f64 * cell, y0 + i as f64 * cell);
            let fill = match v {
                Some(v) => ramp(v / top),
                None => "#bbbbbb".into(),
            };
            let tip = match v {
                Some(v) => format!("{} / {}: {v:.4}", labels[i], labels[j]),
                None => format!("{} / {}: undefined", labels[i], labels[j]),
            };
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="white" stroke-width="0.5"><title>{}</title></rect>"#,
                xml(&tip)
            );
            if cell >= 28.0 {
                if let Some(v) = v {
                    let ink = if v / top > 0.6 { "white" } else { "black" };
                    let _ = write!(
                        s,
                        r#"<text x="{}" y="{}" text-anchor="middle" font-size="{}" fill="{ink}">{:.2}</text>"#,
                        x + cell / 2.0,
                        y + cell / 2.0 + 3.0,
                        (cell * 0.28).min(10.0),
                        v
                    );
                }
            }
        }
    }
    for (i, l) in labels.iter().enumerate() {
        let c = i as f64 * cell + cell / 2.0;
        // Row labels at the left, column labels below, turned.
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            x0 - 4.0,
            y0 + c + font / 3.0,
            xml(l)
        );
        let (tx, ty) = (x0 + c + font / 3.0, y0 + side + 4.0);
        let _ = write!(
            s,
            r#"<text x="{tx}" y="{ty}" text-anchor="end" transform="rotate(-90 {tx} {ty})">{}</text>"#,
            xml(l)
        );
    }
    let steps = 50;
    let bh = side.max(100.0) / steps as f64;
    for i in 0..steps {
        let t = 1.0 - i as f64 / (steps - 1) as f64;
        let _ = write!(
            s,
            r#"<rect x="{bar_x}" y="{}" width="14" height="{}" fill="{}"/>"#,
            y0 + i as f64 * bh,
            bh + 0.5,
            ramp(t)
        );
    }
    for (t, y) in [(top, y0 + 4.0), (0.0, y0 + steps as f64 * bh)] {
        let _ = write!(
            s,
            r#"<text x="{}" y="{y}" font-size="11">{t}</text>"#,
            bar_x + 18.0
        );
    }
    s.push_str("</svg>");
    s
}
