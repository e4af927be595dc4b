"""`make bench` works: benchmarks/run.py at a tiny size writes its three result files.

Runs `python -m benchmarks.run` in a subprocess with BENCH_QUICK=1, one shape at batch 2,
the reference and the default NORM path only (no torch.compile: its first compilation
alone takes longer than this test may), into a temporary BENCH_OUT. Asserts on the files
and the record keys, never on timings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_KEYS = {"shape", "path", "backend", "algorithm", "dtype", "pass", "time_ms",
                 "peak_mem_bytes", "batch"}
SHAPE_NAMES = {"resnet34-resnet18", "resnet50-mobilenet", "resnet32x4-resnet8x4",
               "wrn40_2-wrn16_2", "vgg13-vgg8", "resnet50-mobilenetv2"}


def test_make_bench_tiny(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, BENCH_QUICK="1", BENCH_SHAPES="wrn40_2-wrn16_2", BENCH_BATCH="2",
               BENCH_PATHS="norm_fast-auto", BENCH_DTYPES="float32", BENCH_OUT=str(out),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file(), f"{name} missing; stderr:\n{proc.stderr[-3000:]}"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list) and records
    for rec in records:
        assert REQUIRED_KEYS <= set(rec), sorted(REQUIRED_KEYS - set(rec))
        assert rec["shape"] in SHAPE_NAMES
        assert rec["pass"] in ("forward", "forward+backward")
        assert rec["dtype"] == "float32" and rec["batch"] == 2
    ok = [r for r in records if r.get("status") == "ok"]
    assert {r["path"] for r in ok} >= {"reference", "norm_fast-auto"}, records
    assert {r["pass"] for r in ok} == {"forward", "forward+backward"}
    for rec in ok:
        assert rec["time_ms"] > 0 and rec["peak_mem_bytes"] > 0

    md = (out / "results.md").read_text()
    assert "wrn40_2-wrn16_2" in md and "reference" in md
    info = json.loads((out / "run_info.json").read_text())
    assert info["training_step"], "the training-step share is missing"
