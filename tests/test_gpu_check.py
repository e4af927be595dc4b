"""`make gpu-check DRY_RUN=1` end to end: the GPU run's script rehearsed on the CPU.

Runs benchmarks/gpu_check.sh with DRY_RUN=1 (tiny shapes, Triton's interpreter) into a
temporary folder and checks what a GPU run must leave behind: the eight files, a
summary with PASS/FAIL counts, results.json in `make bench`'s format, correctness rows,
and no step that crashed (a step cut by the time budget is allowed: that is the design).
Takes about 1.5-2 minutes (the run's own budget is 110 s).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

try:  # results.png is drawn only where matplotlib is installed (`make bench` installs it)
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("summary.txt", "run_info.json", "tests.txt", "correctness.json", "results.json",
         "results.md", "results.png", "profile.txt")
REQUIRED_KEYS = ("shape", "path", "backend", "algorithm", "dtype", "pass", "time_ms",
                 "peak_mem_bytes", "batch")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_dry_run")
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), GPU_CHECK_PY=sys.executable)
    env.pop("GPU_CHECK_BUDGET_S", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return out, proc


def test_every_file_is_written(dry_run):
    out, proc = dry_run
    expected = FILES if HAVE_MATPLOTLIB else tuple(f for f in FILES if f != "results.png")
    missing = [f for f in expected if not (out / f).is_file()]
    assert not missing, f"missing {missing}\n{proc.stderr[-3000:]}"
    # plots.py also draws the headline alone, once per dtype (headline[_<dtype>].png)
    extra = sorted(f for f in set(os.listdir(out)) - set(expected)
                   if not (HAVE_MATPLOTLIB and re.fullmatch(r"headline(_\w+)?\.png", f)))
    assert not extra, f"gpu-check may leave only {expected} in OUT, found also {extra}"
    if HAVE_MATPLOTLIB:
        for png in [f for f in os.listdir(out) if f.endswith(".png")]:
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    else:  # said, not silent
        assert "plots not drawn: matplotlib is not installed" in proc.stdout + proc.stderr


def test_no_step_crashed(dry_run):
    out, proc = dry_run
    summary = (out / "summary.txt").read_text()
    steps = next(ln for ln in summary.splitlines() if ln.startswith("steps: "))
    for name in ("env", "tests-triton", "correctness-a", "build-wait", "correctness-b",
                 "timing", "profile", "report"):
        assert re.search(rf"\b{name} ", steps), f"step {name} not in {steps!r}"
    crashed = re.findall(r"([\w-]+) FAILED", steps)
    assert not crashed, f"steps failed: {crashed}\n{summary}\n{proc.stderr[-3000:]}"
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    # the summary is what the device's reply shows: printed last
    assert proc.stdout.strip().endswith(summary.strip().splitlines()[-1])


def test_summary_counts(dry_run):
    out, _ = dry_run
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^tests: PASS \d+  FAIL \d+", summary, re.M), summary
    m = re.search(r"^correctness: PASS (\d+)  FAIL (\d+)  SKIP (\d+)", summary, re.M)
    assert m and int(m.group(1)) > 0, summary
    assert "auto's choice vs the fastest" in summary
    assert "DRY_RUN" in summary
    assert len(summary.splitlines()) <= 60, "summary.txt must fit one screen"


def test_results_json_has_the_bench_format(dry_run):
    out, _ = dry_run
    rows = json.loads((out / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows, "no timing records"
    for r in rows:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing, f"record lacks {missing}: {r}"
        assert r["status"] in ("ok", "failed", "skipped"), r
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, "not one timing row measured"
    assert any(r["path"] == "reference" for r in ok)
    assert all(r["time_ms"] > 0 and r["peak_mem_bytes"] is not None for r in ok
               if not r.get("cuda_graph"))
    graph = [r for r in rows if r["path"] == "norm_fast-auto-cudagraph"]
    assert graph and all("no CUDA" in (r.get("error") or "") or r["status"] == "skipped"
                         for r in graph)


def test_correctness_rows(dry_run):
    out, _ = dry_run
    rows = json.loads((out / "correctness.json").read_text())
    verdicts = {r["verdict"] for r in rows}
    assert verdicts <= {"PASS", "FAIL", "REF", "SKIP"}
    assert "REF" in verdicts and "PASS" in verdicts
    quantities = {r["quantity"] for r in rows if r["verdict"] == "PASS"}
    for q in ("loss", "features", "grad f_s", "grad f_t", "grad expand.weight",
              "expand_bn.running_var"):
        assert q in quantities, f"{q} never checked: {sorted(quantities)}"
    assert {r["dtype"] for r in rows} >= {"float32", "bfloat16"}


def test_environment_and_profile(dry_run):
    out, _ = dry_run
    info = json.loads((out / "run_info.json").read_text())
    env = info["environment"]
    for k in ("python", "torch", "triton", "tf32", "backends"):
        assert k in env, k
    assert set(env["backends"]) == {"torch", "triton", "cpp", "cuda"}
    assert all("reason" in b for b in env["backends"].values())
    assert "extension_build" in env
    profile = (out / "profile.txt").read_text()
    assert "per step" in profile and "kernel rates" in profile
    assert "skipped: no CUDA" in profile
