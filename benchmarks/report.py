"""Turning measurement records into tables, results.md, results.json and the plots.

A record (row) is a dict (benchmarks/measure.py); the keys every consumer may rely on:
    shape, path, backend, algorithm, dtype, pass, time_ms, peak_mem_bytes, batch,
    paper_batch, batch_scaled, noisy, n, status (+ error when not "ok")
(`backend`/`algorithm` are what actually ran; `requested_*` what was asked for; the
literal reference runs as torch/direct). Sweep rows also have `sweep` ("n" or "batch")
and the model's prediction (`model_ms`, sweeps.py). `add_ratios` adds, per measurement
point, speed-ups and memory ratios against the eager literal ("reference") and the
compiled literal ("reference-compiled") measured in the same run.

results.json (schema 2) is an object: {"schema": 2, "rows": [headline rows],
"sweeps": [sweep rows], "training_step": [...]}; benchmarks/README.md documents it.
Writers other scripts call: `write_all(out_dir, records, step_records, info, final=True,
sweeps=None)` and `rerender(out_dir)`.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from . import sweeps as sweeps_mod

SCHEMA = 2
REQUIRED_KEYS = ("shape", "path", "backend", "algorithm", "dtype", "pass", "time_ms",
                 "peak_mem_bytes", "batch", "batch_scaled", "paper_batch", "noisy")
HEADLINE_PASS = "forward+backward"


# --- formatting ---------------------------------------------------------------------
def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_ms(t: Optional[float]) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    return f"{t:.3g}" if t < 10 else f"{t:.1f}" if t < 1000 else f"{t:.0f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}x"


def ok(rec: Optional[dict]) -> bool:
    return rec is not None and rec.get("status") == "ok" and rec.get("time_ms") is not None


def ran_as(r: dict) -> str:
    """What ran, in words a user reads: the literal reference is named so."""
    if (r.get("backend"), r.get("algorithm")) == ("torch", "direct"):
        text = "literal fallback" if r.get("reference_fallback") else "literal reference"
    else:
        text = f"{r.get('backend') or '?'}/{r.get('algorithm') or '?'}"
    return f"{text} (= {r['same_as']})" if r.get("same_as") else text


def batch_text(r: dict) -> str:
    return f"{r['batch']} (paper {r['paper_batch']})" if r.get("batch_scaled") else str(r["batch"])


# --- ratios -------------------------------------------------------------------------
def _point(rec: dict) -> Tuple:
    return (rec.get("sweep") or "", rec["shape"], rec["batch"], rec.get("n"), rec["dtype"],
            rec["pass"])


def add_ratios(records: List[dict]) -> None:
    """speedup_vs_X = time(X) / time(path) (> 1: faster than X); mem_ratio_vs_X =
    peak(path) / peak(X) (< 1: less memory); X = reference (eager literal) or
    compiled (the literal under torch.compile), at the same measurement point."""
    by_point: Dict[Tuple, Dict[str, dict]] = {}
    for r in records:
        by_point.setdefault(_point(r), {})[r["path"]] = r
    for r in records:
        for base, suffix in (("reference", "reference"), ("reference-compiled", "compiled")):
            b = by_point.get(_point(r), {}).get(base)
            good = ok(r) and ok(b)
            r[f"speedup_vs_{suffix}"] = (b["time_ms"] / r["time_ms"]
                                         if good and r["time_ms"] > 0 else None)
            mem_ok = good and r.get("peak_mem_bytes") is not None and b.get("peak_mem_bytes")
            r[f"mem_ratio_vs_{suffix}"] = (r["peak_mem_bytes"] / b["peak_mem_bytes"]
                                           if mem_ok else None)


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


# --- the headline: auto and best per shape ------------------------------------------
def best_per_shape(records: Sequence[dict], pass_: str = HEADLINE_PASS) -> List[dict]:
    """The fastest norm_fast algorithm per (dtype, shape): norm_fast's own direct or
    decomposed forms on any backend (never the literal fallback, never an auto twin)."""
    best: Dict[Tuple[str, str], dict] = {}
    for r in records:
        if (r["pass"] != pass_ or not r["path"].startswith("norm_fast") or not ok(r)
                or r.get("reference_fallback") or r.get("same_as")):
            continue
        k = (r["dtype"], r["shape"])
        if k not in best or r["time_ms"] < best[k]["time_ms"]:
            best[k] = r
    return list(best.values())


SUMMARY_COLUMNS = ("shape", "B", "eager literal ms", "compiled ms", "auto ran as", "auto ms",
                   "auto vs eager", "auto vs compiled", "auto mem vs eager", "best norm_fast",
                   "best ms", "best vs eager", "best vs compiled", "noisy")


def summary_rows(records: Sequence[dict], dtype: str, pass_: str = HEADLINE_PASS
                 ) -> List[List[str]]:
    """One row per shape: the eager and compiled literal, auto (what a user gets) and the
    best norm_fast algorithm, each with its speed-ups."""
    rows, shapes_seen = [], []
    for r in records:
        if r["dtype"] == dtype and r["pass"] == pass_ and r["shape"] not in shapes_seen:
            shapes_seen.append(r["shape"])
    best = {r["shape"]: r for r in best_per_shape(records, pass_) if r["dtype"] == dtype}
    for shape in shapes_seen:
        at = {r["path"]: r for r in records
              if r["shape"] == shape and r["dtype"] == dtype and r["pass"] == pass_}
        lit, comp, auto, b = (at.get("reference"), at.get("reference-compiled"),
                              at.get("norm_fast-auto"), best.get(shape))
        any_rec = next(iter(at.values()))
        noisy = [name for name, x in (("eager", lit), ("compiled", comp), ("auto", auto),
                                      ("best", b)) if x is not None and x.get("noisy")]

        def t(x):
            if ok(x):
                cpu = x.get("time_cpu_ms") if x.get("device") == "cpu" else None
                return fmt_ms(x["time_ms"]) + (f" (CPU {fmt_ms(cpu)})" if cpu else "")
            return x.get("status", "-") if x is not None else "-"

        rows.append([shape, batch_text(any_rec), t(lit), t(comp),
                     ran_as(auto) if auto else "-", t(auto),
                     fmt_ratio((auto or {}).get("speedup_vs_reference")),
                     fmt_ratio((auto or {}).get("speedup_vs_compiled")),
                     fmt_ratio((auto or {}).get("mem_ratio_vs_reference")),
                     ran_as(b) if b else "-", t(b),
                     fmt_ratio((b or {}).get("speedup_vs_reference")),
                     fmt_ratio((b or {}).get("speedup_vs_compiled")),
                     ", ".join(noisy) or "-"])
    return rows


# --- the full table -------------------------------------------------------------------
TABLE_COLUMNS = ("shape", "B", "path", "ran as", "wall ms", "IQR ms", "CPU ms", "peak mem",
                 "vs eager", "vs compiled", "mem vs eager", "flags")


def _flags(r: dict) -> str:
    f = []
    if r.get("noisy"):
        f.append("noisy")
    if r.get("reference_fallback"):
        f.append("literal fallback")
    return ", ".join(f)


def table_rows(records: Sequence[dict]) -> List[List[str]]:
    rows = []
    for r in records:
        if ok(r):
            rows.append([r["shape"], batch_text(r), r["path"], ran_as(r), fmt_ms(r["time_ms"]),
                         fmt_ms(r.get("time_iqr_ms")), fmt_ms(r.get("time_cpu_ms")),
                         fmt_bytes(r.get("peak_mem_bytes")),
                         fmt_ratio(r.get("speedup_vs_reference")),
                         fmt_ratio(r.get("speedup_vs_compiled")),
                         fmt_ratio(r.get("mem_ratio_vs_reference")), _flags(r)])
        else:
            why = (r.get("error") or r.get("status") or "?").splitlines()[0][:70]
            rows.append([r["shape"], batch_text(r), r["path"], ran_as(r),
                         f"{r.get('status', 'failed')}: {why}"] + [""] * 7)
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


# --- sweeps ---------------------------------------------------------------------------
def _sweep_paths(rows: Sequence[dict]) -> List[str]:
    seen: List[str] = []
    for r in rows:
        if r["path"] not in seen:
            seen.append(r["path"])
    return seen


def sweep_table(rows: Sequence[dict], key: str) -> Tuple[List[str], List[List[str]]]:
    """Pivot: one row per swept value, per path "measured ms (model ms)", then peak memory
    of the literal and of auto; auto's choice at each point."""
    names = _sweep_paths(rows)
    values = sorted({r[key] for r in rows})
    header = [key] + [f"{p} ms (model)" for p in names] + ["auto ran as", "peak mem literal",
                                                           "peak mem auto"]
    body = []
    for v in values:
        at = {r["path"]: r for r in rows if r[key] == v}
        cells = [str(v)]
        for p in names:
            r = at.get(p)
            if ok(r):
                cells.append(f"{fmt_ms(r['time_ms'])} ({fmt_ms(r.get('model_ms'))})"
                             + (" noisy" if r.get("noisy") else ""))
            else:
                cells.append((r or {}).get("status", "-"))
        auto = at.get("norm_fast-auto")
        cells += [ran_as(auto) if auto else "-",
                  fmt_bytes((at.get("reference") or {}).get("peak_mem_bytes")),
                  fmt_bytes((auto or {}).get("peak_mem_bytes"))]
        body.append(cells)
    return header, body


def sweep_sections(sweep_rows: Sequence[dict]) -> List[Tuple[str, List[str], List[List[str]], List[str]]]:
    """(title, header, rows, notes) per sweep (and shape, dtype, pass)."""
    out = []
    groups: Dict[Tuple, List[dict]] = {}
    for r in sweep_rows:
        groups.setdefault((r["sweep"], r["shape"], r["dtype"], r["pass"]), []).append(r)
    for (sweep, shape, dtype, pass_), rows in groups.items():
        key = "n" if sweep == "n" else "batch"
        fixed = (f"B={rows[0]['batch']}" + (f" (paper {rows[0]['paper_batch']})"
                                            if rows[0].get("batch_scaled") else "")
                 if sweep == "n" else f"N={rows[0]['n']}")
        title = (f"{'N' if sweep == 'n' else 'batch'} sweep: {shape} "
                 f"{rows[0]['teacher_channels']}->{rows[0]['student_channels']} "
                 f"{rows[0]['height']}x{rows[0]['width']}, {fixed}, {dtype}, {pass_}")
        header, body = sweep_table(rows, key)
        notes = []
        vals = sorted({r[key] for r in rows})
        if len(vals) > 1:
            lo, hi = vals[0], vals[-1]
            for p in _sweep_paths(rows):
                meas, mod = sweeps_mod.growth(rows, p, key, lo, hi)
                if not math.isnan(meas):
                    gm = next((r.get("model_gmacs") for r in rows if r["path"] == p
                               and r.get("model_gmacs")), None)
                    notes.append(f"{p}: {key}={lo}->{hi} time grows {meas:.2f}x measured, "
                                 f"{mod:.2f}x modelled" + (f" (fitted rate {gm:.1f} GMAC/s)"
                                                           if gm else ""))
        out.append((title, header, body, notes))
    return out


# --- rendering ------------------------------------------------------------------------
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
            rows.append([r["dtype"], r["path"], ran_as(r), f"{r.get('status')}: "
                         + (r.get("error") or "").splitlines()[0][:70] if r.get("error") else "-"]
                        + [""] * 4)
            continue
        share = r.get("norm_share")
        rows.append([r["dtype"], r["path"], ran_as(r) if r["path"] != "none" else "-",
                     fmt_ms(r["time_ms"]), fmt_ms(r.get("time_iqr_ms")),
                     fmt_bytes(r.get("peak_mem_bytes")),
                     "-" if share is None else f"{100 * share:.1f}%",
                     fmt_ratio(r.get("slowdown_vs_none"))])
    return rows


LEGEND = ("eager literal = the literal reference module (`reference`), compiled = the same "
          "under torch.compile; vs X = time(X) / time(path) (> 1 is faster); mem vs eager = "
          "peak(path) / peak(eager literal) (< 1 is less); auto = NORM() with its defaults, "
          "what a user gets; best norm_fast = the fastest of norm_fast's own direct / "
          "decomposed forms (never the literal fallback); `literal fallback`: a norm_fast "
          "path (auto) that ran the literal reference; `(= path)`: timed once as that path; "
          "noisy: interquartile range > 20% of the median; CPU = process CPU time (all "
          "threads); B (paper N): the batch was lowered from the paper's to fit the run")


def _sections(records, step_records, sweep_rows, info, table, heading):
    parts = []
    for dtype, pass_, recs in blocks(records):
        if pass_ == HEADLINE_PASS:
            parts += [heading(f"Headline: {dtype}, {pass_}, auto and best per shape"),
                      table(SUMMARY_COLUMNS, summary_rows(records, dtype, pass_))]
    for title, header, body, notes in sweep_sections(sweep_rows):
        parts += [heading(title), table(header, body)] + (["", *notes] if notes else [])
    for dtype, pass_, recs in blocks(records):
        parts += [heading(f"Every path: {dtype}, {pass_}"), table(TABLE_COLUMNS, table_rows(recs))]
    if step_records:
        parts += [heading(f"NORM's share of a training step ({info.get('step_config', '')})"),
                  table(STEP_COLUMNS, step_rows(step_records))]
    return parts


def render_text(records: Sequence[dict], step_records: Sequence[dict], info: dict,
                sweep_rows: Sequence[dict] = ()) -> str:
    parts = _sections(records, step_records, sweep_rows, info, text_table,
                      lambda t: f"\n== {t} ==")
    parts += ["", LEGEND, f"device: {info.get('device_name', '')}; peak memory: "
              f"{info.get('memory_method_short', '')}; load average before / after: "
              f"{info.get('load_average', '?')}"]
    return "\n".join(parts)


INFO_LINES = (("date", "date"), ("command", "command"), ("git", "code (git)"),
              ("torch", "torch"), ("device_name", "device"), ("threads", "CPU threads"),
              ("budget", "time budget"), ("batches", "batches"),
              ("memory_method", "peak memory"), ("timing_method", "time"),
              ("model_method", "model"),
              ("load_average", "load average (1 min) before / after"),
              ("tf32", "TF32 (PyTorch defaults)"), ("env_knobs", "environment"),
              ("plots", "plots"), ("wall_s", "wall time (s)"), ("interrupted", "interrupted"))


def render_markdown(records: Sequence[dict], step_records: Sequence[dict], info: dict,
                    sweep_rows: Sequence[dict] = ()) -> str:
    lines = [f"# NORM benchmarks: {info.get('device_name', '')}", ""]
    for key, label in INFO_LINES:
        if info.get(key) not in (None, "", {}):
            lines.append(f"- {label}: {info[key]}")
    for name, why in info.get("skipped_paths", []):
        lines.append(f"- not run: `{name}`: {why}")
    lines += [f"- {LEGEND}", ""]
    if info.get("figures"):
        lines += [f"![{f}]({f})" for f in info["figures"]] + [""]
    parts = _sections(records, step_records, sweep_rows, info, md_table,
                      lambda t: f"\n## {t}\n")
    return "\n".join(lines + parts) + "\n"


def readme_snippet(records: Sequence[dict], sweep_rows: Sequence[dict], info: dict,
                   run_dir: str) -> str:
    """The README's measured section: the headline and the N sweep, citing the run."""
    lines = [f"Measured by `{info.get('command', 'make bench')}` on {info.get('device_name')} "
             f"(torch {info.get('torch')}, {info.get('threads')} threads, load average "
             f"{info.get('load_average')}), {info.get('date')}: "
             f"[`{run_dir}/results.md`]({run_dir}/results.md) (data: `results.json`, "
             f"plots: `results.png`).", "", f"![make bench: headline, N sweep, batch sweep]"
             f"({run_dir}/results.png)", ""]
    for dtype, pass_, _ in blocks(records):
        if pass_ == HEADLINE_PASS:
            lines += [f"{dtype}, forward + backward:", "",
                      md_table(SUMMARY_COLUMNS, summary_rows(records, dtype, pass_)), ""]
    for title, header, body, notes in sweep_sections(sweep_rows):
        if title.startswith("N sweep"):
            lines += [title + ":", "", md_table(header, body), ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# --- files ----------------------------------------------------------------------------
def results_object(records: List[dict], sweep_rows: List[dict], step_records: List[dict]) -> dict:
    return {"schema": SCHEMA, "rows": records, "sweeps": sweep_rows,
            "training_step": step_records}


def write_all(out_dir: str, records: List[dict], step_records: List[dict], info: dict,
              final: bool = True, sweeps: Optional[List[dict]] = None) -> List[str]:
    """results.json and run_info.json always; results.md and the plots when `final`."""
    os.makedirs(out_dir, exist_ok=True)
    sweep_rows = list(sweeps or [])
    written = []

    def put(name: str, data: str):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        written.append(path)

    if final:
        from . import plots
        figures, why = plots.draw_all(out_dir, records, sweep_rows, info)
        info["figures"] = figures
        info["plots"] = why or ", ".join(figures)
        written += [os.path.join(out_dir, f) for f in figures]
        if why:
            print(f"plots not drawn: {why}", file=sys.stderr)
    put("results.json", json.dumps(results_object(records, sweep_rows, step_records), indent=1,
                                   sort_keys=True, default=str))
    put("run_info.json", json.dumps(dict(info, training_step=step_records), indent=1,
                                    sort_keys=True, default=str))
    if final:
        put("results.md", render_markdown(records, step_records, info, sweep_rows))
    return written


def load(out_dir: str) -> Tuple[List[dict], List[dict], List[dict], dict]:
    """(rows, sweep rows, training-step rows, info) of a run; reads schema 1 (a list)
    and schema 2 files."""
    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    with open(os.path.join(out_dir, "run_info.json")) as f:
        info = json.load(f)
    step_records = info.pop("training_step", [])
    if isinstance(data, list):
        return data, [], step_records, info
    return data["rows"], data.get("sweeps", []), data.get("training_step", step_records), info


def rerender(out_dir: str) -> List[str]:
    """Rewrite results.md and the plots of a finished run from its JSON files (after a
    report change, or for results copied from another machine)."""
    records, sweep_rows, step_records, info = load(out_dir)
    add_ratios(records + sweep_rows)
    add_step_shares(step_records)
    if sweep_rows:
        sweeps_mod.add_model(sweep_rows)
    return write_all(out_dir, records, step_records, info, final=True, sweeps=sweep_rows)


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                 description="rewrite results.md and the plots of runs, or "
                                             "print the README's measured section")
    ap.add_argument("dirs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--readme", action="store_true",
                    help="print the README snippet (headline + N sweep) of one run")
    ap.add_argument("--update-readme", action="store_true",
                    help="with --readme: write it into README.md between the bench markers")
    args = ap.parse_args(argv)
    for d in args.dirs:
        if args.readme:
            records, sweep_rows, _, info = load(d)
            rel = os.path.relpath(os.path.abspath(d), REPO)
            snippet = readme_snippet(records, sweep_rows, info, rel)
            print(snippet)
            if args.update_readme:
                update_readme(os.path.join(REPO, "README.md"), snippet)
        else:
            print("\n".join(rerender(d)))
    return 0


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_BEGIN, README_END = "<!-- bench:begin", "<!-- bench:end -->"


def update_readme(path: str, snippet: str) -> None:
    """Replace what lies between the README's bench markers (kept) by `snippet`."""
    with open(path) as f:
        text = f.read()
    a = text.find(README_BEGIN)
    b = text.find(README_END)
    if a < 0 or b < a:
        raise SystemExit(f"{path}: no '{README_BEGIN} ... -->' / '{README_END}' markers")
    a = text.index("\n", a) + 1
    with open(path, "w") as f:
        f.write(text[:a] + snippet.rstrip() + "\n" + text[b:])


if __name__ == "__main__":
    sys.exit(main())
