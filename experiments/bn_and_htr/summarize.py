"""summarize.py OUT_DIR [DEST_DIR]
Turn the runs of run.sh into DEST_DIR/results-tables.md (the tables of results.md),
DEST_DIR/summary.json (the same numbers) and copy the runs' SVG figures to DEST_DIR/figures/.
DEST_DIR defaults to this script's folder. Stdlib only.

Definitions
- lambda_1, lambda_10: the largest and 10th-largest Hessian eigenvalues (Lanczos Ritz values,
  `top_eigenvalues`), data loss only (weight decay would add its 5e-4 to each).
- bulk edge: from the SLQ quadrature (all runs pooled, each run's weights / runs), remove
  the top 10/n of spectral mass (what 10 eigenvalues weigh in a density of n) and take
  the largest node left; i.e. where the density is after its top-10 outliers. With 2 runs
  of 30 Lanczos steps this is coarse (nodes are few; a node carries ~1/30 of the mass).
- g in top-10: fraction of the squared gradient norm (data loss, fixed 256-sample subset)
  in the span of the top-10 eigenvectors (`grad_frac_in_top_k[9]`); top-1 likewise.
- trace: Hutchinson, 10 Rademacher probes, +- its standard error.
- middle trace: (1/P) sum v^T H_S v over Sankar et al.'s middle tensors S, 20 probes,
  via `hesscope trace-grad --layer middle` (fixed subset, batch-mode BN), +- stderr.
"""
import json, math, os, shutil, sys

def load(path):
    with open(path) as f:
        return json.load(f)

def bulk_edge_value(c, nparams, top=10):
    runs = c["runs"]
    pts = sorted(((x, w / len(runs)) for r in runs for x, w in zip(r["nodes"], r["weights"])), reverse=True)
    cut, acc = top / nparams, 0.0
    for x, w in pts:
        acc += w
        if acc > cut:
            return x
    return pts[-1][0]

def records(traj):
    out = [dict(traj["start"], epoch=0)]
    out += traj["epochs"]
    return out

def fmt(x, spec=".4g"):
    return "–" if x is None else format(x, spec)

def mid_trace(out, run, e):
    p = os.path.join(out, "bn" if e == 0 else run, f"midtrace-{e}.json")
    if not os.path.exists(p) or os.path.getsize(p) == 0:
        return None, None
    r = load(p)
    v = r["per_probe"]
    m = sum(v) / len(v)
    se = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else None
    return r["estimate"], se

COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]

def panels_svg(path, title, panels):
    """panels: [(ylabel, [(label, [(x, y), ...]), ...]), ...] -> a small line-plot SVG."""
    W, PH, L, R, T = 640, 170, 70, 150, 40
    H = T + PH * len(panels) + 30
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>']
    for i, (ylabel, series) in enumerate(panels):
        y0 = T + i * PH
        pts = [p for _, ps in series for p in ps if p[1] is not None]
        xs = [p[0] for p in pts]; ys = [p[1] for p in pts]
        x_lo, x_hi = min(xs), max(xs)
        y_lo, y_hi = min(0.0, min(ys)), max(ys)
        y_hi = y_hi if y_hi > y_lo else y_lo + 1
        pw, ph = W - L - R, PH - 40
        X = lambda x: L + (x - x_lo) / max(x_hi - x_lo, 1e-12) * pw
        Y = lambda y: y0 + 10 + ph - (y - y_lo) / (y_hi - y_lo) * ph
        o.append(f'<line x1="{L}" y1="{Y(y_lo)}" x2="{L + pw}" y2="{Y(y_lo)}" stroke="black"/>')
        o.append(f'<line x1="{L}" y1="{y0 + 10}" x2="{L}" y2="{y0 + 10 + ph}" stroke="black"/>')
        for k in range(5):
            yv = y_lo + (y_hi - y_lo) * k / 4
            o.append(f'<text x="{L - 5}" y="{Y(yv) + 4}" text-anchor="end">{yv:.3g}</text>')
        for xv in range(int(x_lo), int(x_hi) + 1):
            o.append(f'<text x="{X(xv)}" y="{y0 + 10 + ph + 14}" text-anchor="middle">{xv}</text>')
        o.append(f'<text x="15" y="{y0 + 10 + ph / 2}" transform="rotate(-90 15 {y0 + 10 + ph / 2})" text-anchor="middle">{ylabel}</text>')
        for j, (label, ps) in enumerate(series):
            ps = [p for p in ps if p[1] is not None]
            c = COLORS[j % len(COLORS)]
            o.append('<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>'
                     % (c, " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in ps)))
            for x, y in ps:
                o.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{c}"/>')
            o.append(f'<text x="{L + pw + 10}" y="{y0 + 20 + 14 * j}" fill="{c}">{label}</text>')
    o.append(f'<text x="{L + (W - L - R) / 2}" y="{H - 5}" text-anchor="middle">epoch</text></svg>')
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")

def main():
    out = sys.argv[1]
    dest = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(os.path.abspath(__file__))
    nparams = {"bn": 1400, "nobn": 1364}
    summary, lines = {}, []
    # --- batch norm on / off
    lines.append("### Batch norm on / off (cnn-tiny vs cnn-tiny-nobn, same start)\n")
    lines.append("| epoch | net | train loss | train acc | test acc | λ1 | λ10 | bulk edge | λ1 / bulk edge | g in top-1 | g in top-10 | trace (Hutchinson) | SLQ neg. mass |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in ("bn", "nobn"):
        summary[run] = []
    tr = {run: records(load(os.path.join(out, run, "trajectory.json"))) for run in ("bn", "nobn")}
    for e in range(len(tr["bn"])):
        for run in ("bn", "nobn"):
            r = tr[run][e]
            c = r.get("curvature")
            row = {"epoch": r["epoch"], "train_loss": r.get("train_loss"), "train_accuracy": r.get("train_accuracy"),
                   "train_eval_loss": r.get("train_eval_loss"), "test_accuracy": r.get("test_accuracy"),
                   "test_loss": r.get("test_loss")}
            if c:
                be = bulk_edge_value(c, nparams[run])
                row.update(lambda_1=c["top_eigenvalues"][0], lambda_10=c["top_eigenvalues"][9], bulk_edge=be,
                           g_top1=c["grad_frac_in_top_k"][0], g_top10=c["grad_frac_in_top_k"][9],
                           trace=c["trace"], trace_stderr=c["trace_stderr"], negative_mass=c["negative_mass"],
                           slq_lambda_min=c["lambda_min"], grad_norm=c["grad_norm"], loss_subset=c["loss"],
                           eigs_converged=c["eigs_converged"], hvps=c.get("hvps"), seconds=c.get("seconds"))
            summary[run].append(row)
            tl = row["train_loss"] if row["train_loss"] is not None else row["train_eval_loss"]
            name = "BN" if run == "bn" else "no BN"
            ratio = row["lambda_1"] / row["bulk_edge"] if row.get("bulk_edge") and row["bulk_edge"] > 0 else None
            lines.append(f"| {row['epoch']} | {name} | {fmt(tl, '.3f')} | {fmt(row['train_accuracy'], '.3f')} | "
                         f"{fmt(row['test_accuracy'], '.3f')} | {fmt(row.get('lambda_1'))} | {fmt(row.get('lambda_10'))} | "
                         f"{fmt(row.get('bulk_edge'))} | {fmt(ratio, '.3g')} | {fmt(row.get('g_top1'), '.3f')} | "
                         f"{fmt(row.get('g_top10'), '.3f')} | {fmt(row.get('trace'), '.3g')} ± {fmt(row.get('trace_stderr'), '.2g')} | "
                         f"{fmt(row.get('negative_mass'), '.2f')} |")
    lines.append("\nEpoch 0 is the start (train loss there: the training set's loss in eval mode, i.e. BN on its initial running buffers).\n")
    # --- HTR
    runs = [("bn", 0.0)] + [(f"htr-{g}", float(g)) for g in ("1e-4", "1e-3", "1e-2")]
    runs = [(r, g) for r, g in runs if os.path.exists(os.path.join(out, r, "trajectory.json"))]
    lines.append("### Hessian-trace regulariser on the middle tensors (cnn-tiny)\n")
    htr = {}
    for run, g in runs:
        rec = records(load(os.path.join(out, run, "trajectory.json")))
        htr[run] = []
        for r in rec:
            m, se = mid_trace(out, run, r["epoch"])
            htr[run].append({"epoch": r["epoch"], "gamma": g, "train_loss": r.get("train_loss", r.get("train_eval_loss")),
                             "train_accuracy": r.get("train_accuracy"), "test_accuracy": r.get("test_accuracy"),
                             "test_loss": r.get("test_loss"), "middle_trace": m, "middle_trace_stderr": se,
                             "htr_value": (r.get("htr") or {}).get("value")})
    summary["htr"] = htr
    quantities = [("middle tensors' Hessian trace (20 probes, ± stderr)", lambda x: f"{fmt(x['middle_trace'], '.3g')} ± {fmt(x['middle_trace_stderr'], '.2g')}"),
                  ("test accuracy", lambda x: fmt(x["test_accuracy"], ".3f")),
                  ("train loss (epoch's mean step loss; epoch 0: eval-mode loss)", lambda x: fmt(x["train_loss"], ".3f")),
                  ("HTR value (mean one-probe estimate over the epoch's regularised steps)", lambda x: fmt(x["htr_value"], ".3g"))]
    for qname, q in quantities:
        lines.append(f"**{qname}**\n")
        lines.append("| epoch | " + " | ".join(f"γ = {g:g}" for _, g in runs) + " |")
        lines.append("|---:|" + "---:|" * len(runs))
        for e in range(max(len(v) for v in htr.values())):
            lines.append(f"| {e} | " + " | ".join(q(htr[r][e]) if e < len(htr[r]) else "–" for r, _ in runs) + " |")
        lines.append("")
    lines.append("\nγ=0 is the BN run above (the same recipe, no regulariser). HTR value: the mean over the epoch's "
                 "steps of the regulariser's own one-probe estimate on each step's mini-batch (before that step).\n")
    os.makedirs(os.path.join(dest, "figures"), exist_ok=True)
    for run, _ in [("bn", 0), ("nobn", 0)] + runs[1:]:
        for f in ("training.svg", "densities.svg", "curvature.svg"):
            p = os.path.join(out, run, f)
            if os.path.exists(p):
                shutil.copy(p, os.path.join(dest, "figures", f"{run}-{f}"))
    ser = lambda rows, k: [(r["epoch"], r.get(k)) for r in rows]
    bn, nb = summary["bn"], summary["nobn"]
    panels_svg(os.path.join(dest, "figures", "bn-vs-nobn.svg"),
               "cnn-tiny with / without BN, same start: curvature of the data loss (256 samples)",
               [("λ1", [("BN", ser(bn, "lambda_1")), ("no BN", ser(nb, "lambda_1"))]),
                ("bulk edge", [("BN", ser(bn, "bulk_edge")), ("no BN", ser(nb, "bulk_edge"))]),
                ("‖g‖² in top-10", [("BN", ser(bn, "g_top10")), ("no BN", ser(nb, "g_top10"))]),
                ("test accuracy", [("BN", ser(bn, "test_accuracy")), ("no BN", ser(nb, "test_accuracy"))])])
    panels_svg(os.path.join(dest, "figures", "htr.svg"),
               "cnn-tiny, Hessian-trace regulariser on the middle tensors",
               [("middle trace", [(f"γ={g:g}", ser(htr[r], "middle_trace")) for r, g in runs]),
                ("test accuracy", [(f"γ={g:g}", ser(htr[r], "test_accuracy")) for r, g in runs]),
                ("train loss", [(f"γ={g:g}", ser(htr[r], "train_loss")) for r, g in runs])])
    with open(os.path.join(dest, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(dest, "results-tables.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
