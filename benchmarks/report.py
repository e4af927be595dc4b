"""Turning measurement records into the printed table, results.md, results.json, results.png.

A record is a dict (see `run.measure_path`); the keys every consumer may rely on are
    shape, path, backend, algorithm, dtype, pass, time_ms, peak_mem_bytes, batch
(`backend`/`algorithm` are what actually ran; `requested_*` what was asked for). A record
that failed or was skipped has `status` != "ok", `time_ms` None and an `error`.
`add_ratios` adds, per (shape, dtype, pass), speed-ups and memory ratios against the
reference and against the compiled reference measured in the same run.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .barchart_png import Chart

REQUIRED_KEYS = ("shape", "path", "backend", "algorithm", "dtype", "pass", "time_ms",
                 "peak_mem_bytes", "batch")

PATH_COLORS = {
    "reference": (140, 140, 140),
    "reference-compiled": (85, 85, 85),
    "norm_fast-auto": (214, 39, 40),
}
BACKEND_COLORS = {"torch": (31, 119, 180), "cpp": (44, 160, 44), "triton": (255, 127, 14),
                  "cuda": (148, 103, 189)}


def _key(rec: dict) -> Tuple[str, str, str]:
    return rec["shape"], rec["dtype"], rec["pass"]


def _ok(rec: Optional[dict]) -> bool:
    return rec is not None and rec.get("status") == "ok" and rec.get("time_ms") is not None


def add_ratios(records: List[dict]) -> None:
    """speedup_vs_X = time(X) / time(path) (> 1: faster than X); mem_ratio_vs_X =
    peak(path) / peak(X) (< 1: less memory), X in reference, reference-compiled."""
    by_key: Dict[Tuple[str, str, str], Dict[str, dict]] = {}
    for r in records:
        by_key.setdefault(_key(r), {})[r["path"]] = r
    for r in records:
        for base, suffix in (("reference", "reference"), ("reference-compiled", "compiled")):
            b = by_key.get(_key(r), {}).get(base)
            good = _ok(r) and _ok(b)
            timed = good and r["time_ms"] > 0
            r[f"speedup_vs_{suffix}"] = b["time_ms"] / r["time_ms"] if timed else None
            mem_ok = good and r.get("peak_mem_bytes") is not None and b.get("peak_mem_bytes")
            r[f"mem_ratio_vs_{suffix}"] = (r["peak_mem_bytes"] / b["peak_mem_bytes"]
                                           if mem_ok else None)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_ms(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return f"{t:.3g}" if t < 10 else f"{t:.1f}" if t < 1000 else f"{t:.0f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ran_as(r: dict) -> str:
    ran = f"{r.get('backend') or '?'}/{r.get('algorithm') or '?'}"
    return f"{ran} (= {r['same_as']})" if r.get("same_as") else ran


TABLE_COLUMNS = ("shape", "B", "path", "ran as", "time ms", "IQR ms", "peak mem",
                 "speed-up vs ref", "mem vs ref", "speed-up vs compiled", "mem vs compiled")


def table_rows(records: Sequence[dict]) -> List[List[str]]:
    rows = []
    for r in records:
        if _ok(r):
            rows.append([r["shape"], str(r["batch"]), r["path"], _ran_as(r), fmt_ms(r["time_ms"]),
                         fmt_ms(r.get("time_iqr_ms")), fmt_bytes(r.get("peak_mem_bytes")),
                         fmt_ratio(r.get("speedup_vs_reference")),
                         fmt_ratio(r.get("mem_ratio_vs_reference")),
                         fmt_ratio(r.get("speedup_vs_compiled")),
                         fmt_ratio(r.get("mem_ratio_vs_compiled"))])
        else:
            why = (r.get("error") or r.get("status") or "?").splitlines()[0][:70]
            rows.append([r["shape"], str(r["batch"]), r["path"], _ran_as(r),
                         f"{r.get('status', 'failed')}: {why}"] + [""] * 6)
    return rows


def blocks(records: Sequence[dict]) -> List[Tuple[str, str, List[dict]]]:
    """Records grouped by (dtype, pass), in first-seen order."""
    order: List[Tuple[str, str]] = []
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in records:
        k = (r["dtype"], r["pass"])
        if k not in groups:
            order.append(k)
            groups[k] = []
        groups[k].append(r)
    return [(d, p, groups[(d, p)]) for d, p in order]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns; a row whose last cell is empty (a failure message in place of the
    numbers) does not widen the columns."""
    widths = [len(h) for h in header]
    for row in rows:
        if row and row[-1] == "" and len(row) > 1:
            continue
        for i, cell in enumerate(row[:len(widths)]):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(out)


STEP_COLUMNS = ("dtype", "NORM path", "ran as", "step ms", "IQR ms", "peak mem",
                "NORM share of step", "step vs no NORM")


def step_rows(step_records: Sequence[dict]) -> List[List[str]]:
    rows = []
    for r in step_records:
        if r.get("status") != "ok":
            rows.append([r["dtype"], r["path"], _ran_as(r), f"{r.get('status')}: "
                         + (r.get("error") or "").splitlines()[0][:70] if r.get("error") else "-"]
                        + [""] * 4)
            continue
        share = r.get("norm_share")
        rows.append([r["dtype"], r["path"], _ran_as(r) if r["path"] != "none" else "-",
                     fmt_ms(r["time_ms"]), fmt_ms(r.get("time_iqr_ms")),
                     fmt_bytes(r.get("peak_mem_bytes")),
                     "-" if share is None else f"{100 * share:.1f}%",
                     fmt_ratio(r.get("slowdown_vs_none"))])
    return rows


def add_step_shares(step_records: List[dict]) -> None:
    """norm_share = (t - t_without) / t: the fraction of a step NORM costs on this path."""
    base = {r["dtype"]: r for r in step_records if r["path"] == "none" and r.get("status") == "ok"}
    for r in step_records:
        b = base.get(r["dtype"])
        if r.get("status") == "ok" and b is not None and r["path"] != "none":
            r["norm_share"] = (r["time_ms"] - b["time_ms"]) / r["time_ms"]
            r["slowdown_vs_none"] = r["time_ms"] / b["time_ms"]
        else:
            r["norm_share"] = None
            r["slowdown_vs_none"] = None


def render_text(records: Sequence[dict], step_records: Sequence[dict], info: dict) -> str:
    parts = []
    for dtype, pass_, recs in blocks(records):
        parts.append(f"\n== {dtype}, {pass_} ({info.get('device_name', '')}) ==")
        parts.append(text_table(TABLE_COLUMNS, table_rows(recs)))
    if step_records:
        parts.append(f"\n== training step: {info.get('step_config', '')} ==")
        parts.append(text_table(STEP_COLUMNS, step_rows(step_records)))
    parts.append("\nspeed-up = reference time / path time (> 1 is faster); "
                 "mem = path peak / reference peak (< 1 is less)")
    parts.append(f"peak memory: {info.get('memory_method', '')}")
    return "\n".join(parts)


def render_markdown(records: Sequence[dict], step_records: Sequence[dict], info: dict) -> str:
    lines = [f"# NORM benchmarks: {info.get('device_name', '')}", ""]
    for key, label in (("date", "date"), ("command", "command"), ("torch", "torch"),
                       ("device_name", "device"), ("threads", "CPU threads"),
                       ("scaling", "shapes"), ("memory_method", "peak memory"),
                       ("timing_method", "time"),
                       ("load_average", "load average (1 min) before / after"),
                       ("tf32", "TF32 (PyTorch defaults)"), ("env_knobs", "environment"),
                       ("wall_s", "wall time (s)")):
        if info.get(key) not in (None, ""):
            lines.append(f"- {label}: {info[key]}")
    for name, why in info.get("skipped_paths", []):
        lines.append(f"- not run: `{name}`: {why}")
    lines.append("- speed-up = reference time / path time (> 1 is faster); mem = path peak / "
                 "reference peak (< 1 is less); `ran as` = the backend/algorithm that ran; "
                 "`(= path)`: an auto path that runs that path's code at this shape, whose "
                 "numbers it shares (timed once)")
    for dtype, pass_, recs in blocks(records):
        lines += ["", f"## {dtype}, {pass_}", "", md_table(TABLE_COLUMNS, table_rows(recs))]
    if step_records:
        lines += ["", f"## NORM's share of a training step ({info.get('step_config', '')})", "",
                  md_table(STEP_COLUMNS, step_rows(step_records))]
    best = best_per_shape(records)
    if best:
        lines += ["", "## Best norm_fast path per shape (forward+backward)", "",
                  md_table(("dtype", "shape", "best path", "time ms", "speed-up vs ref",
                            "mem vs ref", "speed-up vs compiled", "mem vs compiled"),
                           [[r["dtype"], r["shape"], r["path"], fmt_ms(r["time_ms"]),
                             fmt_ratio(r.get("speedup_vs_reference")),
                             fmt_ratio(r.get("mem_ratio_vs_reference")),
                             fmt_ratio(r.get("speedup_vs_compiled")),
                             fmt_ratio(r.get("mem_ratio_vs_compiled"))] for r in best])]
    return "\n".join(lines) + "\n"


def best_per_shape(records: Sequence[dict], pass_: str = "forward+backward") -> List[dict]:
    """The fastest norm_fast path per (dtype, shape) for one pass."""
    best: Dict[Tuple[str, str], dict] = {}
    for r in records:
        if r["pass"] != pass_ or not r["path"].startswith("norm_fast") or not _ok(r):
            continue
        k = (r["dtype"], r["shape"])
        if k not in best or r["time_ms"] < best[k]["time_ms"] or (
                r["time_ms"] == best[k]["time_ms"] and best[k].get("same_as")):
            best[k] = r
    return list(best.values())


def path_color(r: dict) -> Tuple[int, int, int]:
    if r["path"] in PATH_COLORS:
        return PATH_COLORS[r["path"]]
    base = BACKEND_COLORS.get(r.get("requested_backend") or r.get("backend"), (23, 190, 207))
    alg = r.get("requested_algorithm", "")
    shade = {"direct": 0.75, "decomposed": 1.0, "auto": 1.2}.get(alg, 1.0)
    return tuple(min(255, int(c * shade)) for c in base)


def render_png(records: Sequence[dict], info: dict,
               passes: Iterable[str] = ("forward+backward",)) -> bytes:
    chart = Chart("NORM loss: time and peak memory per shape and path "
                  f"({info.get('device_name', '')})",
                  notes=[f"shapes: {info.get('scaling', '')}",
                         "bars are scaled per shape (longest = slowest / largest); "
                         "text: value (speed-up or memory ratio against the reference)",
                         "peak memory: " + info.get("memory_method_short", "")])
    for dtype, pass_, recs in blocks(records):
        if pass_ not in passes:
            continue
        sec = chart.section(f"{dtype}, {pass_}")
        tcol = sec.column("time per call")
        mcol = sec.column("peak memory above inputs")
        shapes_seen: List[str] = []
        for r in recs:
            if r["shape"] not in shapes_seen:
                shapes_seen.append(r["shape"])
        for shape in shapes_seen:
            rs = [r for r in recs if r["shape"] == shape]
            label = f"{shape}  B={rs[0]['batch']}"
            tg, mg = tcol.group(label), mcol.group(label)
            for r in rs:
                color = path_color(r)
                if _ok(r):
                    sp, mr = r.get("speedup_vs_reference"), r.get("mem_ratio_vs_reference")
                    is_ref = r["path"] == "reference"
                    tg.bar(r["path"], r["time_ms"], f"{fmt_ms(r['time_ms'])} ms"
                           + (f" ({sp:.2f}x)" if sp is not None and not is_ref else ""), color)
                    mg.bar(r["path"], r.get("peak_mem_bytes"), fmt_bytes(r.get("peak_mem_bytes"))
                           + (f" ({mr:.2f}x)" if mr is not None and not is_ref else ""), color)
                else:
                    tg.bar(r["path"], None, r.get("status", "failed"), color)
                    mg.bar(r["path"], None, r.get("status", "failed"), color)
    return chart.render()


def write_all(out_dir: str, records: List[dict], step_records: List[dict], info: dict,
              final: bool = True) -> List[str]:
    """results.json (+ run_info.json) always; results.md and results.png when `final`."""
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def put(name: str, data, mode: str = "w"):
        path = os.path.join(out_dir, name)
        tmp = path + ".tmp"
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, path)
        written.append(path)

    put("results.json", json.dumps(records, indent=1, sort_keys=True))
    put("run_info.json", json.dumps(dict(info, training_step=step_records), indent=1,
                                    sort_keys=True, default=str))
    if final:
        put("results.md", render_markdown(records, step_records, info))
        put("results.png", render_png(records, info), "wb")
    return written


def rerender(out_dir: str) -> List[str]:
    """Rewrite results.md and results.png of a finished run from its results.json and
    run_info.json (after a report change, or for results copied from another machine)."""
    with open(os.path.join(out_dir, "results.json")) as f:
        records = json.load(f)
    with open(os.path.join(out_dir, "run_info.json")) as f:
        info = json.load(f)
    step_records = info.pop("training_step", [])
    add_ratios(records)
    add_step_shares(step_records)
    return write_all(out_dir, records, step_records, info, final=True)


if __name__ == "__main__":
    import sys
    if len(sys.argv) < 2:
        sys.exit("usage: python -m benchmarks.report RESULTS_DIR...  (rewrites results.md/.png)")
    for d in sys.argv[1:]:
        print("\n".join(rerender(d)))
