//! What `hesscope train` writes besides its checkpoints: trajectory.json
//! and its plots (training.svg; with curvature, densities.svg and
//! curvature.svg), each file written atomically.

use anyhow::{Context, Result};
use hesscope::model::Model;
use hesscope::report::{CurvatureRecord, EpochRecord, Exporter};
use hesscope::spectral::plot::{densities_svg, panels_svg, DensitySeries, Panel, Series};
use hesscope::train::write_atomic;
use hesscope::train::TrainReport;
use std::path::{Path, PathBuf};

/// DIR/trajectory.json and the plots.
pub fn write_trajectory(
    dir: &Path,
    model: &Model,
    r: &TrainReport,
) -> Result<(PathBuf, Vec<PathBuf>)> {
    let traj = dir.join("trajectory.json");
    write_atomic(&traj, |p| Exporter::JsonPretty.write(p, r))
        .with_context(|| format!("writing {}", traj.display()))?;
    let plots = write_plots(dir, model, r)?;
    Ok((traj, plots))
}

/// training.svg always; with curvature, densities.svg and curvature.svg.
fn write_plots(dir: &Path, model: &Model, r: &TrainReport) -> Result<Vec<PathBuf>> {
    let mut written = vec![];
    let mut write = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        write_atomic(&p, |f| {
            std::fs::write(f, &text).map_err(|e| hesscope::Error::io(f, e))
        })
        .with_context(|| format!("writing {}", p.display()))?;
        written.push(p);
        Ok(())
    };
    let start = r.start.as_ref();
    let ep = |e: usize| e as f64;
    // Loss and accuracy; the same series keep the same colour in both panels.
    let pts = |f: &dyn Fn(&EpochRecord) -> Option<f64>, s0: Option<f64>| -> Vec<(f64, f64)> {
        s0.map(|v| (0.0, v))
            .into_iter()
            .chain(
                r.epochs
                    .iter()
                    .filter_map(|e| f(e).map(|v| (ep(e.epoch), v))),
            )
            .collect()
    };
    let mut loss = vec![Series {
        label: "train (eval)".into(),
        points: pts(
            &|e| e.train_eval_loss,
            start.and_then(|s| s.train_eval_loss),
        ),
    }];
    let mut acc = vec![Series {
        label: "train (eval)".into(),
        points: pts(&|e| e.train_accuracy, start.and_then(|s| s.train_accuracy)),
    }];
    if r.epochs.iter().any(|e| e.test_loss.is_some()) {
        loss.push(Series {
            label: "test".into(),
            points: pts(&|e| e.test_loss, start.and_then(|s| s.test_loss)),
        });
        acc.push(Series {
            label: "test".into(),
            points: pts(&|e| e.test_accuracy, start.and_then(|s| s.test_accuracy)),
        });
    }
    loss.push(Series {
        label: "train (steps' mean)".into(),
        points: r
            .epochs
            .iter()
            .map(|e| (ep(e.epoch), e.train_loss))
            .collect(),
    });
    let mut panels = vec![
        Panel {
            y_label: "cross-entropy".into(),
            series: loss,
        },
        Panel {
            y_label: "accuracy".into(),
            series: acc,
        },
    ];
    if r.htr.is_some() {
        panels.push(Panel {
            y_label: "regulariser (1/P)Σ vᵀH_S v".into(),
            series: vec![Series {
                label: "epoch mean".into(),
                points: pts(&|e| e.htr.as_ref().and_then(|h| h.value), None),
            }],
        });
    }
    write(
        "training.svg",
        panels_svg(
            &format!("{}: loss and accuracy", model.name),
            "epoch",
            &panels,
        ),
    )?;
    // Curvature.
    let curv: Vec<(usize, &CurvatureRecord)> = start
        .and_then(|s| s.curvature.as_ref().map(|c| (0, c)))
        .into_iter()
        .chain(
            r.epochs
                .iter()
                .filter_map(|e| e.curvature.as_ref().map(|c| (e.epoch, c))),
        )
        .collect();
    if !curv.is_empty() {
        let series: Vec<DensitySeries> = curv
            .iter()
            .map(|(e, c)| DensitySeries {
                label: format!("epoch {e}"),
                grid: &c.grid,
                density: &c.density,
            })
            .collect();
        write(
            "densities.svg",
            densities_svg(
                &format!(
                    "{}: Hessian density along training ({} samples, bn {})",
                    model.name, curv[0].1.samples, curv[0].1.bn
                ),
                &series,
            ),
        )?;
        let k = curv[0].1.grad_frac_in_top_k.len();
        let line = |label: &str, f: &dyn Fn(&CurvatureRecord) -> Option<f64>| Series {
            label: label.into(),
            points: curv
                .iter()
                .filter_map(|(e, c)| f(c).map(|v| (ep(*e), v)))
                .collect(),
        };
        let mut panels = vec![
            Panel {
                y_label: "λmax".into(),
                series: vec![line("λ1 (Lanczos)", &|c| {
                    c.top_eigenvalues.first().copied()
                })],
            },
            Panel {
                y_label: "trace".into(),
                series: vec![line("Hutchinson", &|c| Some(c.trace))],
            },
            Panel {
                y_label: "‖g‖² fraction".into(),
                series: vec![
                    line("top 1", &|c| c.grad_frac_in_top_k.first().copied()),
                    line(&format!("top {k}"), &|c| {
                        c.grad_frac_in_top_k.last().copied()
                    }),
                ],
            },
        ];
        let modules: Vec<String> = curv[0].1.layers.iter().map(|l| l.module.clone()).collect();
        if !modules.is_empty() {
            let per = |f: fn(&hesscope::report::LayerCurvature) -> f64| -> Vec<Series> {
                modules
                    .iter()
                    .map(|m| Series {
                        label: m.clone(),
                        points: curv
                            .iter()
                            .filter_map(|(e, c)| {
                                c.layers
                                    .iter()
                                    .find(|l| &l.module == m)
                                    .map(|l| (ep(*e), f(l)))
                            })
                            .collect(),
                    })
                    .collect()
            };
            panels.push(Panel {
                y_label: "module λmax".into(),
                series: per(|l| l.lambda_max),
            });
            panels.push(Panel {
                y_label: "module trace".into(),
                series: per(|l| l.trace),
            });
        }
        if curv.iter().any(|(_, c)| c.papyan.is_some()) {
            // Papyan's H = G + E along training (`--papyan`).
            panels.push(Panel {
                y_label: "λmax (SLQ)".into(),
                series: vec![
                    line("H", &|c| Some(c.lambda_max)),
                    line("G", &|c| c.papyan.as_ref().map(|p| p.ggn.lambda_max)),
                    line("E", &|c| c.papyan.as_ref().map(|p| p.residual.lambda_max)),
                ],
            });
            panels.push(Panel {
                y_label: "negative mass".into(),
                series: vec![
                    line("H", &|c| Some(c.negative_mass)),
                    line("E", &|c| {
                        c.papyan.as_ref().map(|p| p.residual.negative_mass)
                    }),
                ],
            });
            panels.push(Panel {
                y_label: "G outliers".into(),
                series: vec![
                    line("above the widest gap", &|c| {
                        c.papyan.as_ref().map(|p| p.outliers as f64)
                    }),
                    line("classes", &|c| c.papyan.as_ref().map(|p| p.classes as f64)),
                ],
            });
        }
        write(
            "curvature.svg",
            panels_svg(
                &format!(
                    "{}: curvature of the data loss along training ({} samples)",
                    model.name, curv[0].1.samples
                ),
                "epoch",
                &panels,
            ),
        )?;
    }
    Ok(written)
}
