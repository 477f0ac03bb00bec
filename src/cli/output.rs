//! Printing results: one JSON object with --json, readable lines otherwise.

use anyhow::Result;
use serde_json::Value;

pub fn vnorm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

pub fn emit(json: bool, value: Value) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(&value)?);
        return Ok(());
    }
    if let Value::Object(map) = value {
        let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, v) in map {
            if v.is_null() {
                continue;
            }
            let shown = match &v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.as_f64().map(fmt_num).unwrap_or_else(|| n.to_string()),
                other => other.to_string(),
            };
            println!("{k:>width$}  {shown}");
        }
    }
    Ok(())
}

fn fmt_num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e6) {
        format!("{x:.6e}")
    } else {
        format!("{x:.6}")
    }
}
