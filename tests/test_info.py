"""The backend report: `norm_fast.info()` and `python -m norm_fast`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import norm_fast
from norm_fast import dispatch
from norm_fast.info import format_info, main, parse_shape

ROOT = Path(__file__).resolve().parents[1]


def test_info_lists_every_backend_as_dispatch_sees_it():
    rep = norm_fast.info()
    assert rep["versions"]["torch"] == torch.__version__
    assert [row["backend"] for row in rep["backends"]] == list(dispatch.REGISTRY)
    for row in rep["backends"]:
        ok, why = dispatch.is_available(row["backend"])
        assert (row["available"], row["reason"]) == (ok, why)
        assert row["devices"] == dispatch.devices_of(row["backend"])
        assert row["reason"]                     # always a reason, available or not
    assert "plan" not in rep
    text = str(rep)
    for name in dispatch.REGISTRY:
        assert f"\n  {name} " in text
    assert text == repr(rep) == format_info(rep)


@pytest.mark.parametrize("shape", [(64, 512, 512, 7, 7, 8), (64, 2048, 1280, 2, 2, 8),
                                   (2, 4, 3, 2, 2, 1)])
def test_plan_is_what_resolve_returns(shape):
    rep = norm_fast.info(shape=shape, device="cpu")
    plan = dispatch.resolve("auto", "auto", "cpu", *shape)
    assert (rep["plan"]["backend"], rep["plan"]["algorithm"]) == (plan.backend, plan.algorithm)
    B, C_s, C_t, H, W, n = shape
    cost = rep["plan"]["cost (forward+backward)"]
    assert cost == dispatch.cost_model(B, C_s, C_t, H, W, n, "cpu")
    text = str(rep)
    assert f"auto picks: backend={plan.backend!r}, algorithm={plan.algorithm!r}" in text
    for name in cost:
        assert f"    {name} " in text


def test_shape_string_and_dtype():
    rep = norm_fast.info("8,16,16,4,4,8", dtype="bfloat16", device="cpu")
    assert rep["plan"]["shape"] == dict(B=8, C_s=16, C_t=16, H=4, W=4, N=8)
    assert rep["plan"]["dtype"] == "bfloat16"
    assert rep["plan"]["accumulation dtype"] == "float32"


def test_environment_override_is_reported(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    monkeypatch.setenv(dispatch.ENV_ALGORITHM, "decomposed")
    rep = norm_fast.info((8, 16, 16, 4, 4, 8), device="cpu")
    assert (rep["plan"]["backend"], rep["plan"]["algorithm"]) == ("torch", "decomposed")
    assert "forced by the environment: NORM_FAST_BACKEND=torch" in str(rep)


@pytest.mark.parametrize("shape,exc,match", [
    ("8,16,16,4,4", ValueError, "six entries"),
    ("8,16,x,4,4,8", ValueError, "six comma-separated integers"),
    ("8,16,16,0,4,8", ValueError, "H=0"),
    ((8, 16, 16, 4, 4, 8.0), TypeError, "six ints"),
    (8, TypeError, "sequence of six"),
])
def test_bad_shapes(shape, exc, match):
    with pytest.raises(exc, match=match):
        parse_shape(shape)
    with pytest.raises(exc, match=match):
        norm_fast.info(shape)


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="dtype must be one of"):
        norm_fast.info(dtype="int8")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        norm_fast.info(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            norm_fast.info(device="cuda")


def test_cli_prints_the_report_and_rejects_bad_arguments(capsys):
    assert main(["--shape", "8,16,16,4,4,8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("norm_fast backend report") and "auto picks" in out
    with pytest.raises(SystemExit) as e:
        main(["--shape", "8,16"])
    assert e.value.code == 2
    assert "six entries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dtype", "int8"])


def test_python_dash_m_runs():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", "norm_fast", "--shape", "4,8,8,2,2,2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Backends (backend=...):" in proc.stdout and "auto picks" in proc.stdout
