"""`make bench` works: benchmarks/run.py at a tiny size writes its tables, JSON and plots.

Runs `python -m benchmarks.run` in a subprocess with BENCH_QUICK=1: one headline shape at
batch 2, the reference and the default NORM path only (no torch.compile: its first
compilation alone takes longer than this test may), an N sweep over N = 1, 2 and a batch
sweep over B = 1, 2, into a temporary BENCH_OUT. Asserts on the files, the record keys and
the terminal output, never on timings. One thread (OMP_NUM_THREADS=1): on a loaded
machine two spinning OpenMP threads make each tiny call many times slower.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"shape", "path", "backend", "algorithm", "dtype", "pass", "time_ms",
            "peak_mem_bytes", "batch", "batch_scaled", "paper_batch", "noisy", "n",
            "time_cpu_ms", "speedup_vs_reference", "speedup_vs_compiled"}
SHAPE_NAMES = {"resnet34-resnet18", "resnet50-mobilenet", "resnet32x4-resnet8x4",
               "wrn40_2-wrn16_2", "vgg13-vgg8", "resnet50-mobilenetv2"}


def test_make_bench_tiny(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, BENCH_QUICK="1", BENCH_SHAPES="wrn40_2-wrn16_2", BENCH_BATCH="2",
               BENCH_PATHS="norm_fast-auto", BENCH_DTYPES="float32", BENCH_OUT=str(out),
               BENCH_N_VALUES="1,2", BENCH_SWEEP_BATCHES="1,2", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KINETO_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "USDT" not in proc.stderr + proc.stdout, "profiler noise on the terminal"

    for name in ("results.json", "results.md", "run_info.json"):
        assert (out / name).is_file(), f"{name} missing; stderr:\n{proc.stderr[-3000:]}"
    info = json.loads((out / "run_info.json").read_text())
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("results.png", "headline.png", "n_sweep.png", "batch_sweep.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    else:  # the optional dependency missing is said, not hidden
        assert "matplotlib" in info["plots"] and "matplotlib" in proc.stderr

    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == 2 and set(data) >= {"rows", "sweeps", "training_step"}
    rows, sweep_rows = data["rows"], data["sweeps"]
    assert rows and sweep_rows
    for rec in rows + sweep_rows:
        assert ROW_KEYS <= set(rec), sorted(ROW_KEYS - set(rec))
        assert rec["shape"] in SHAPE_NAMES
        assert rec["pass"] == "forward+backward" and rec["dtype"] == "float32"
    for rec in rows:
        assert rec["batch"] == 2 and rec["paper_batch"] == 64 and rec["batch_scaled"] is True
        assert "sweep" not in rec
    ok = [r for r in rows if r.get("status") == "ok"]
    assert {r["path"] for r in ok} >= {"reference", "norm_fast-auto"}, rows
    for rec in ok:
        assert rec["time_ms"] > 0 and rec["peak_mem_bytes"] > 0
        assert isinstance(rec["noisy"], bool) and rec["time_cpu_ms"] is not None

    by_sweep = {s: [r for r in sweep_rows if r["sweep"] == s] for s in ("n", "batch")}
    assert {r["n"] for r in by_sweep["n"]} == {1, 2}
    assert {r["shape"] for r in by_sweep["n"]} == {"resnet34-resnet18"}
    assert {r["batch"] for r in by_sweep["batch"]} == {1, 2}
    assert {r["shape"] for r in by_sweep["batch"]} == {"resnet34-resnet18", "vgg13-vgg8"}
    for rec in sweep_rows:
        if rec.get("status") == "ok":
            assert rec["model_ms"] > 0 and rec["model_macs"] > 0

    md = (out / "results.md").read_text()
    assert "Headline" in md and "N sweep" in md and "batch sweep" in md
    assert "wrn40_2-wrn16_2" in md and "2 (paper 64)" in md
    assert data["training_step"] and info["training_step"]


def test_default_output_is_new_per_run(tmp_path, monkeypatch):
    sys.path.insert(0, REPO)
    from benchmarks import run
    import torch
    first = run.default_out_dir(torch.device("cpu"))
    os.makedirs(first)
    try:
        second = run.default_out_dir(torch.device("cpu"))
        assert second != first and not os.path.exists(second)
    finally:
        os.rmdir(first)
