"""The figures of `make bench` (matplotlib, an optional dependency installed by `make bench`).

headline.png     per shape, forward+backward: speed-up over the eager literal of the
                 compiled literal, norm_fast auto and the best norm_fast algorithm (bars,
                 labelled with their times), and their peak memory against the literal's
headline.png is drawn per dtype (headline_bfloat16.png for the second dtype);
n_sweep.png      time and peak memory against N, measured (markers, solid) and the cost
                 model fitted per path (dashed; benchmarks/sweeps.py)
batch_sweep.png  time against the batch per sweep shape; auto's markers show its choice
results.png      all of the above in one figure
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

COLORS = {"reference": "#7f7f7f", "reference-compiled": "#303030", "norm_fast-auto": "#d62728"}
ALG_COLORS = {"direct": "#1f77b4", "decomposed": "#2ca02c", "auto": "#ff7f0e"}
CHOICE_MARKERS = {"literal": "o", "direct": "^", "decomposed": "s"}


def _color(path: str) -> str:
    """Fixed colours: the literal grey, auto red, norm_fast-<backend>-<algorithm> by
    algorithm (the pure-PyTorch backend in a lighter shade)."""
    if path in COLORS:
        return COLORS[path]
    _, backend, alg = (path.split("-", 2) + ["", ""])[:3]
    if backend == "torch":
        return {"decomposed": "#98df8a", "direct": "#aec7e8"}.get(alg, "#ffbb78")
    return ALG_COLORS.get(alg, "#17becf")


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok" and r.get("time_ms")


def _choice(r: dict) -> str:
    if (r.get("backend"), r.get("algorithm")) == ("torch", "direct"):
        return "literal"
    return r.get("algorithm") or "?"


def headline_axes(ax_t, ax_m, records: Sequence[dict], dtype: str) -> bool:
    from .report import HEADLINE_PASS, best_per_shape, fmt_ms
    recs = [r for r in records if r["dtype"] == dtype and r["pass"] == HEADLINE_PASS]
    shapes: List[str] = []
    for r in recs:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    if not shapes:
        return False
    best = {r["shape"]: r for r in best_per_shape(records) if r["dtype"] == dtype}
    series = (("compiled literal", "reference-compiled"), ("norm_fast auto", "norm_fast-auto"),
              ("best norm_fast algorithm", None))
    width = 0.8 / len(series)
    for i, (name, path) in enumerate(series):
        xs, sp, mem, labels = [], [], [], []
        for j, shape in enumerate(shapes):
            at = {r["path"]: r for r in recs if r["shape"] == shape}
            r = best.get(shape) if path is None else at.get(path)
            if not _ok(r) or r.get("speedup_vs_reference") is None:
                continue
            xs.append(j + (i - 1) * width)
            sp.append(r["speedup_vs_reference"])
            mem.append(r.get("mem_ratio_vs_reference") or float("nan"))
            labels.append(f"{fmt_ms(r['time_ms'])} ms")
        color = "#2ca02c" if path is None else COLORS[path]
        bars = ax_t.bar(xs, sp, width, label=name, color=color)
        for b, text in zip(bars, labels):
            ax_t.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()),
                          ha="center", va="bottom", fontsize=6, rotation=90,
                          xytext=(0, 2), textcoords="offset points")
        ax_m.bar(xs, mem, width, label=name, color=color)
    ticks = []
    for shape in shapes:
        r = next(r for r in recs if r["shape"] == shape)
        ticks.append(f"{shape}\nB={r['batch']}" + (f" (paper {r['paper_batch']})"
                                                   if r.get("batch_scaled") else ""))
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(ticks, fontsize=7, rotation=20, ha="right")
        ax.axhline(1.0, color=COLORS["reference"], lw=1, ls="--", label="eager literal = 1")
        ax.set_yscale("log")
        _plain_ticks(ax)
        ax.grid(axis="y", alpha=0.3, which="both")
    ax_t.set_ylabel("speed-up over the eager literal (x, log scale)")
    ax_t.set_title(f"forward+backward time, {dtype} (bar labels: wall ms)", fontsize=9)
    ax_m.set_ylabel("peak memory / eager literal's (log scale)")
    ax_m.set_title(f"peak memory above the inputs, {dtype}", fontsize=9)
    ax_t.legend(fontsize=7)
    return True


def _sweep_groups(sweep_rows: Sequence[dict], sweep: str) -> Dict[Tuple, List[dict]]:
    groups: Dict[Tuple, List[dict]] = {}
    for r in sweep_rows:
        if r.get("sweep") == sweep and r["dtype"] == "float32":
            groups.setdefault((r["shape"], r["pass"]), []).append(r)
    return groups


def _lines(ax, rows: Sequence[dict], key: str, field: str, scale: float, model: bool) -> None:
    paths: List[str] = []
    for r in rows:
        # norm_fast-<backend>-auto always repeats one of that backend's algorithms: drawn
        # once, as that algorithm; norm_fast-auto (what a user gets) is drawn, thick.
        if r["path"] not in paths and not (r["path"].endswith("-auto")
                                           and r["path"] != "norm_fast-auto"):
            paths.append(r["path"])
    for p in paths:
        pts = sorted((r for r in rows if r["path"] == p and _ok(r)), key=lambda r: r[key])
        if not pts or pts[0].get(field) is None:
            continue
        color = _color(p)
        auto = p == "norm_fast-auto"
        xs = [r[key] for r in pts]
        ax.plot(xs, [r[field] / scale for r in pts], "-", color=color, lw=2.5 if auto else 1.2,
                label=p, zorder=3 if auto else 2, alpha=0.8)
        for r in pts:
            ax.plot(r[key], r[field] / scale, CHOICE_MARKERS.get(_choice(r), "x"),
                    color=color, ms=6 if auto else 4, zorder=4 if auto else 2,
                    mfc="white" if r.get("noisy") else color)
        if model and all(r.get("model_ms") for r in pts) and not auto:
            ax.plot(xs, [r["model_ms"] for r in pts], "--", color=color, lw=0.9, alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    values = sorted({r[key] for r in rows})
    ax.set_xticks(values)
    _plain_ticks(ax, x=True)
    ax.grid(alpha=0.3, which="both")


def _plain_ticks(ax, x: bool = False) -> None:
    """Numbers as numbers (64, 0.5) on log axes, not powers of ten; the x axis of a sweep
    labels the swept values only."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    if x:
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(NullFormatter())


def n_sweep_axes(ax_t, ax_m, sweep_rows: Sequence[dict]) -> bool:
    groups = _sweep_groups(sweep_rows, "n")
    if not groups:
        return False
    (shape, pass_), rows = next(iter(groups.items()))
    r0 = rows[0]
    what = (f"{shape} {r0['teacher_channels']}->{r0['student_channels']} {r0['height']}x"
            f"{r0['width']}, B={r0['batch']}, {pass_}")
    _lines(ax_t, rows, "n", "time_ms", 1.0, model=True)
    ax_t.set_xlabel("N (segments)")
    ax_t.set_ylabel("wall time per call (ms, log scale)")
    ax_t.set_title(f"time vs N: {what}\nsolid: measured; dashed: cost model, rate fitted "
                   "per path", fontsize=8)
    _lines(ax_m, rows, "n", "peak_mem_bytes", 2**20, model=False)
    ax_m.set_xlabel("N (segments)")
    ax_m.set_ylabel("peak memory above the inputs (MiB, log scale)")
    ax_m.set_title(f"peak memory vs N: {what}", fontsize=8)
    ax_t.legend(fontsize=6)
    return True


def batch_sweep_axes(axes: Sequence, sweep_rows: Sequence[dict]) -> bool:
    groups = list(_sweep_groups(sweep_rows, "batch").items())
    if not groups:
        return False
    for ax, ((shape, pass_), rows) in zip(axes, groups):
        r0 = rows[0]
        _lines(ax, rows, "batch", "time_ms", 1.0, model=False)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("wall time per call (ms, log scale)")
        ax.set_title(f"time vs batch: {shape} {r0['teacher_channels']}->"
                     f"{r0['student_channels']} {r0['height']}x{r0['width']}, N={r0['n']}, "
                     f"{pass_}\nmarkers: o literal, s decomposed, ^ direct (hollow: noisy)",
                     fontsize=8)
        ax.legend(fontsize=6)
    return True


def draw_all(out_dir: str, records: Sequence[dict], sweep_rows: Sequence[dict],
             info: dict) -> Tuple[List[str], Optional[str]]:
    """Write the PNGs; (file names written, None) or ([], why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ("matplotlib is not installed (`make bench` installs it; or pip install "
                    "matplotlib)")
    written: List[str] = []
    device = info.get("device_name", "")

    def save(fig, name: str) -> None:
        fig.suptitle(f"NORM loss benchmarks, {device}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        written.append(name)

    dtypes: List[str] = []
    for r in records:
        if r["dtype"] not in dtypes:
            dtypes.append(r["dtype"])
    for i, dtype in enumerate(dtypes):
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
        if headline_axes(a, b, records, dtype):
            save(fig, "headline.png" if i == 0 else f"headline_{dtype}.png")
        else:
            plt.close(fig)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    if n_sweep_axes(a, b, sweep_rows):
        save(fig, "n_sweep.png")
    else:
        plt.close(fig)
    n_batch = len(_sweep_groups(sweep_rows, "batch"))
    if n_batch:
        fig, axes = plt.subplots(1, n_batch, figsize=(6 * n_batch, 4.5), squeeze=False)
        batch_sweep_axes(axes[0], sweep_rows)
        save(fig, "batch_sweep.png")

    # The combined figure: headline (first dtype), N sweep, batch sweeps.
    fig, axes = plt.subplots(3, 2, figsize=(13, 14))
    drawn = [headline_axes(axes[0][0], axes[0][1], records, dtypes[0]) if dtypes else False,
             n_sweep_axes(axes[1][0], axes[1][1], sweep_rows),
             batch_sweep_axes(axes[2], sweep_rows)]
    for row, d in zip(axes, drawn):
        if not d:
            for ax in row:
                ax.set_axis_off()
    save(fig, "results.png")
    return written, None
