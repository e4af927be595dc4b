"""A new user's install: `pip install .` (build isolation, non-editable) into a fresh venv,
then the backend report and a NORM forward + backward on the C++ backend, from outside the
source tree; then `pip install -e .` into the same venv.

The fresh venv reuses the torch this test runs under (a .pth line pointing at torch's
site-packages) instead of installing one: pip then sees `torch` installed and installs
only ninja, and the test needs no network and no multi-GB download. The package, its
C++ sources and its metadata come only from the copy of the source tree installed here:
the test checks that `norm_fast` is imported from the venv, that the C++ extension is
JIT-built from the installed `norm_fast/csrc/` into a fresh cache, with the first-use
message, and that the cpp backend's loss and gradient equal the literal reference's.
About a minute (the first-use compile is most of it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900        # seconds per command: pip and a cold C++ compile on a busy machine

pytestmark = pytest.mark.slow

# Runs in the fresh venv, in an empty directory: a NORM step on the cpp backend against the
# literal reference (backend="torch"), same parameters, float64.
SMOKE = r"""
import os, sys, torch, norm_fast
from norm_fast import NORM, dispatch
print("imported from", os.path.dirname(norm_fast.__file__))
ok, why = dispatch.is_available("cpp")
assert ok, why
torch.manual_seed(0)
f_s = torch.randn(4, 6, 3, 3, dtype=torch.float64)
f_t = torch.randn(4, 5, 3, 3, dtype=torch.float64)
results = []
for backend, algorithm in (("torch", "direct"), ("cpp", "direct"), ("cpp", "decomposed")):
    torch.manual_seed(1)
    norm = NORM(6, 5, n=3, backend=backend, algorithm=algorithm).double()
    x = f_s.clone().requires_grad_(True)
    feats, loss = norm(x, f_t)
    (loss + feats.square().mean()).backward()
    results.append((backend, algorithm, loss.detach(), x.grad, norm.expand.weight.grad))
ref = results[0]
for backend, algorithm, loss, gx, gw in results[1:]:
    for name, a, b in (("loss", loss, ref[2]), ("grad f_s", gx, ref[3]), ("grad W1", gw, ref[4])):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-10, (backend, algorithm, name, err)
    print(f"{backend}/{algorithm}: loss {loss.item():.12f} equals the reference")
print("SMOKE OK")
"""


def run(cmd, cwd, env, what):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}"
    return out


def copy_tree(dst: Path) -> Path:
    """The source tree without build outputs (a prebuilt _C, build/, venvs, caches)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so", "*.pyd",
                                    "__pycache__", ".torch_ext", ".pytest_cache",
                                    ".benchmarks", "results")
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    venv = base / "venv"
    python = getattr(sys, "_base_executable", None) or sys.executable
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TORCH_EXTENSIONS_DIR",
                        "NORM_FAST_NO_EXTENSION", "NORM_FAST_BACKEND", "NORM_FAST_ALGORITHM")}
    env["TORCH_EXTENSIONS_DIR"] = str(base / "torch_extensions")      # a cold cache
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    run([python, "-m", "venv", str(venv)], base, env, "python -m venv")
    py = venv / "bin" / "python"
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               base, env, "reading the venv's site-packages").strip().splitlines()[-1]
    # Reuse this process's torch (and what sits beside it) instead of downloading one.
    torch_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    Path(site, "_reuse_parent_torch.pth").write_text(torch_site + "\n")
    return {"base": base, "py": py, "env": env, "src": copy_tree(base / "src"),
            "site": Path(site), "work": base}


def test_pip_install_dot_builds_on_first_use(fresh_venv):
    v = fresh_venv
    out = run([str(v["py"]), "-m", "pip", "install", str(v["src"])], v["work"], v["env"],
              "pip install . (build isolation)")
    assert "Successfully installed" in out and "norm_fast-0.1.0" in out, out[-3000:]
    pkg = v["site"] / "norm_fast"
    assert (pkg / "csrc" / "bindings.cpp").is_file() and \
        (pkg / "csrc" / "cpu" / "norm_cpu.cpp").is_file(), "csrc/ is not in the wheel"
    assert not list(pkg.glob("_C*.so")), "an isolated build should not compile the extension"

    report = run([str(v["py"]), "-m", "norm_fast", "--shape", "8,16,16,4,4,8"], v["work"],
                 v["env"], "python -m norm_fast")
    print(report)
    assert "norm_fast: compiling the C++ extension" in report      # the first-use message
    assert str(v["env"]["TORCH_EXTENSIONS_DIR"]) in report         # ... says where the cache is
    assert str(pkg / "csrc") in report                             # built from the wheel's copy
    assert "cpp     runs on cpu       available" in report, report
    assert "auto picks: backend=" in report

    smoke_dir = v["work"] / "elsewhere"
    smoke_dir.mkdir()
    out = run([str(v["py"]), "-c", SMOKE], smoke_dir, v["env"], "NORM on the cpp backend")
    assert f"imported from {pkg}" in out, out
    assert "SMOKE OK" in out and "compiling" not in out, out      # cached: no second build


def test_pip_install_editable(fresh_venv):
    v = fresh_venv
    out = run([str(v["py"]), "-m", "pip", "install", "-e", str(v["src"])], v["work"], v["env"],
              "pip install -e . (build isolation)")
    assert "Successfully installed" in out, out[-3000:]
    smoke_dir = v["work"] / "elsewhere-editable"
    smoke_dir.mkdir()
    out = run([str(v["py"]), "-c", SMOKE], smoke_dir, v["env"], "NORM after pip install -e .")
    assert f"imported from {v['src'] / 'norm_fast'}" in out, out
    assert "SMOKE OK" in out, out
