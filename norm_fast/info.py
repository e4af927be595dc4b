"""What this installation can run, and what `backend="auto"` picks for a shape: the backend report.

    python -m norm_fast                                      # versions, devices, backends
    python -m norm_fast --shape 64,512,512,7,7,8             # + the plan for that shape
    python -m norm_fast --shape 64,512,512,7,7,8 --dtype bfloat16 --device cuda
    norm_fast.info(shape=(64, 512, 512, 7, 7, 8))           # the same, as an `Info` object

Every fact comes from where the library itself reads it: backends from
`dispatch.REGISTRY`, `dispatch.is_available` (the reason when not) and
`dispatch.devices_of`; the plan from `dispatch.resolve` (the call `NORM.forward`
makes), its reasons from `dispatch.cost_model`. Probing the "cpp" backend loads the C++
extension, which compiles it on first use (a message says so, on stderr).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from importlib import metadata
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import dispatch
from .ops import extension
from .ops.spec import compute_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
SHAPE_FIELDS = ("B", "C_s", "C_t", "H", "W", "N")


class Info(dict):
    """The report as a dict (keys: versions, devices, extension, backends, plan), printed
    as text: `print(norm_fast.info())`, or just `norm_fast.info()` at a prompt."""

    def __str__(self) -> str:
        return format_info(self)

    __repr__ = __str__


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def parse_shape(shape) -> Tuple[int, ...]:
    """(B, C_s, C_t, H, W, N) from "B,Cs,Ct,H,W,N" or a sequence of six positive ints."""
    if isinstance(shape, str):
        parts = [p.strip() for p in shape.split(",")]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"shape must be six comma-separated integers B,Cs,Ct,H,W,N "
                             f"(e.g. 64,512,512,7,7,8), got {shape!r}") from None
    else:
        try:
            values = tuple(shape)
        except TypeError:
            raise TypeError(f"shape must be a string 'B,Cs,Ct,H,W,N' or a sequence of six "
                            f"ints, got {type(shape).__name__}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"shape must hold six ints (B, C_s, C_t, H, W, N), got {values!r}")
    if len(values) != 6:
        raise ValueError(f"shape must have six entries B,Cs,Ct,H,W,N, got {len(values)}: "
                         f"{values!r}")
    bad = [f"{name}={v}" for name, v in zip(SHAPE_FIELDS, values) if v < 1]
    if bad:
        raise ValueError(f"every entry of the shape must be >= 1, got {', '.join(bad)}")
    return values


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _check_device(device: Optional[str]) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device here "
                         f"(torch.cuda.is_available() is False; torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no, a CPU-only build'})")
    return device


def _versions() -> Dict[str, str]:
    return {
        "norm_fast": _version("norm_fast"),
        "norm_fast (imported from)": os.path.dirname(os.path.abspath(__file__)),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "none (CPU-only build)",
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "ninja": _version("ninja"),
        "platform": f"{platform.system()} {platform.machine()}",
    }


def _devices() -> List[str]:
    out = [f"cpu: {torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, "
                       f"{p.total_memory / 2**30:.0f} GiB")
    else:
        out.append("cuda: none visible (torch.cuda.is_available() is False)")
    return out


def _extension() -> Dict[str, str]:
    from torch.utils import cpp_extension
    module, how = extension.load()
    return {"C++ extension": how if module is not None else f"not loaded: {how}",
            "C++ sources": extension._CSRC,
            "extension cache": os.environ.get("TORCH_EXTENSIONS_DIR")
            or cpp_extension.get_default_build_root(),
            "C++ compiler": extension._compiler() or "none found",
            "CUDA toolkit (CUDA_HOME)": cpp_extension.CUDA_HOME or "none found"}


def _backends() -> List[Dict[str, object]]:
    rows = []
    for name in dispatch.REGISTRY:
        ok, why = dispatch.is_available(name)
        devices = dispatch.devices_of(name)
        note = ""
        if name == "triton" and "cpu" in devices:
            note = "on CPU tensors: Triton's interpreter (exact, slow; auto never picks it)"
        rows.append({"backend": name, "devices": devices, "available": ok, "reason": why,
                     "note": note})
    return rows


def _plan(shape: Tuple[int, ...], dtype: torch.dtype, device: str) -> Dict[str, object]:
    B, C_s, C_t, H, W, n = shape
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = dispatch.resolve("auto", "auto", device, B, C_s, C_t, H, W, n, dtype)
    skipped = []
    for name in dispatch.AUTO_ORDER.get(device, ("torch",)):
        ok, why = dispatch.is_available(name)
        if ok:
            break
        skipped.append(f"{name}: {why}")
    if device == "cuda":  # seconds, the GPU time model (with the backend auto resolved to)
        cost = dispatch.gpu_time_model(B, C_s, C_t, H, W, n, plan.backend, dtype,
                                       bool(torch.backends.cudnn.allow_tf32))
        unit = "seconds (dispatch.gpu_time_model, an H200 estimate)"
    else:
        cost = dispatch.cost_model(B, C_s, C_t, H, W, n, device)
        unit = "multiply-add equivalents (dispatch.cost_model)"
    copies = getattr(dispatch, "_LITERAL_COPIES", 5)
    expanded_bytes = copies * 4 * n * C_t * B * H * W
    overrides = {k: os.environ[k] for k in (dispatch.ENV_BACKEND, dispatch.ENV_ALGORITHM)
                 if os.environ.get(k, "").strip()}
    return {"shape": dict(zip(SHAPE_FIELDS, shape)), "dtype": str(dtype).replace("torch.", ""),
            "device": device, "backend": plan.backend, "algorithm": plan.algorithm,
            "auto order": dispatch.AUTO_ORDER.get(device, ("torch",)), "skipped": skipped,
            "cost (forward+backward)": cost, "cost unit": unit,
            "literal expanded bytes": expanded_bytes,
            "literal memory limit": dispatch.literal_memory_limit(device),
            "accumulation dtype": str(compute_dtype(dtype)).replace("torch.", ""),
            "environment overrides": overrides,
            "warnings": [str(w.message) for w in caught]}


def info(shape=None, dtype="float32", device: Optional[str] = None) -> Info:
    """The backend report: versions, devices, the C++ extension, each backend available or
    why not; with `shape` = (B, C_s, C_t, H, W, N) (or "B,Cs,Ct,H,W,N") also the plan
    `backend="auto", algorithm="auto"` resolves to on `device` ("cpu", "cuda"; default
    cuda when available) and its cost figures. `dtype` ("float32", "bfloat16", "float16",
    "float64"): the dtype of the products (as under autocast); on CPU the choice does not
    depend on it, on CUDA the time model charges its rate.

    Raises ValueError/TypeError for a malformed shape, an unknown dtype or device, or
    device="cuda" without a CUDA device.
    """
    parsed = parse_shape(shape) if shape is not None else None
    dt = _check_dtype(dtype)
    dev = _check_device(device)
    out = Info(versions=_versions(), devices=_devices(), extension=_extension(),
               backends=_backends())
    if parsed is not None:
        out["plan"] = _plan(parsed, dt, dev)
    return out


def _fmt_macs(x: float) -> str:
    return f"{x / 1e9:.3g} G" if x >= 1e8 else f"{x / 1e6:.3g} M"


def format_info(rep: Dict) -> str:
    """The text `python -m norm_fast` prints for an `info()` result."""
    lines = ["norm_fast backend report", "", "Versions:"]
    width = max(len(k) for k in rep["versions"])
    lines += [f"  {k:<{width}}  {v}" for k, v in rep["versions"].items()]
    lines += ["", "Devices:"] + [f"  {d}" for d in rep["devices"]]
    lines += ["", "C++ extension:"]
    width = max(len(k) for k in rep["extension"])
    lines += [f"  {k:<{width}}  {v}" for k, v in rep["extension"].items()]
    lines += ["", "Backends (backend=...):"]
    for row in rep["backends"]:
        state = "available" if row["available"] else "NOT available"
        lines.append(f"  {row['backend']:<7} runs on {'/'.join(row['devices']):<9} "
                     f"{state}: {row['reason']}")
        if row["note"]:
            lines.append(f"  {'':<7} {row['note']}")
    lines.append("  auto    per device, the first available of: " + "; ".join(
        f"{d}: {' > '.join(order)}" for d, order in dispatch.AUTO_ORDER.items()))
    plan = rep.get("plan")
    if plan:
        s = plan["shape"]
        lines += ["", f"Plan for B={s['B']}, C_s={s['C_s']}, C_t={s['C_t']}, H={s['H']}, "
                      f"W={s['W']}, N={s['N']}, {plan['dtype']} on {plan['device']} "
                      f"(backend='auto', algorithm='auto'):",
                  f"  auto picks: backend={plan['backend']!r}, algorithm={plan['algorithm']!r}"
                  + ("  (the literal reference computation)"
                     if plan["algorithm"] == "literal" else "")]
        if plan["environment overrides"]:
            lines.append("  forced by the environment: " + ", ".join(
                f"{k}={v}" for k, v in plan["environment overrides"].items()))
        why = [f"first available of {' > '.join(plan['auto order'])}"]
        if plan["skipped"]:
            why.append("skipped " + "; ".join(plan["skipped"]))
        lines.append("  backend: " + ", ".join(why))
        lines.append(f"  estimated cost of one forward+backward, {plan['cost unit']}:")
        cost = plan["cost (forward+backward)"]
        fmt = ((lambda v: f"{v * 1e3:.3f} ms") if plan["device"] == "cuda" else _fmt_macs)
        best = min(cost.values())
        for name, value in sorted(cost.items(), key=lambda kv: kv[1]):
            extra = ""
            if name == "literal":
                fits = plan["literal expanded bytes"] <= plan["literal memory limit"]
                extra = (f"  (candidate: its expanded tensors, {plan['literal expanded bytes'] / 2**20:.1f}"
                         f" MiB, fit the {plan['literal memory limit'] / 2**20:.0f} MiB limit)"
                         if fits else
                         f"  (NOT a candidate: its expanded tensors, "
                         f"{plan['literal expanded bytes'] / 2**20:.1f} MiB, exceed the "
                         f"{plan['literal memory limit'] / 2**20:.0f} MiB limit)")
            lines.append(f"    {name:<11} {fmt(value):>9}  {value / best:5.2f}x{extra}")
        lines.append(f"  accumulation dtype: {plan['accumulation dtype']}")
        for w in plan["warnings"]:
            lines.append(f"  warning: {w}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m norm_fast",
        description="norm_fast backend report: versions, devices, which backends run here "
                    "(or exactly why not), and with --shape what backend='auto' picks.")
    p.add_argument("--shape", metavar="B,Cs,Ct,H,W,N",
                   help="a NORM problem: batch, student channels, teacher channels, height, "
                        "width, expansion factor N (e.g. 64,512,512,7,7,8)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="input dtype (default float32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device type of the plan (default: cuda when available, else cpu)")
    args = p.parse_args(argv)
    try:
        rep = info(args.shape, args.dtype, args.device)
    except (ValueError, TypeError) as exc:
        p.error(str(exc))          # exits with status 2 and the usage line
    print(format_info(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
