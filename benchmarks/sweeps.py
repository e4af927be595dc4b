"""The two sweeps of `make bench`, and the cost model's prediction beside each point.

N sweep      resnet34-resnet18 (512->512, 7x7), N in 1, 2, 4, 8, 16, at B=256 where the
             budget allows (GPU), else the largest halving that fits (plan.py): time and
             peak memory of the eager literal, the compiled literal, norm_fast auto and
             every algorithm. The literal's P-sized work grows linearly in N; norm_fast's
             does not, only its N*C_t x C_s algebra does (docs/design.md section 5).
batch sweep  time against the batch at one ImageNet pair (resnet34-resnet18) and one
             CIFAR pair (vgg13-vgg8), for the literal, auto and the automatic backend's
             direct and decomposed forms: auto's choice changes along the sweep (the
             literal form at small batches, the decomposed one above).

The model (`add_model`): `dispatch.cost_model` gives multiply-add equivalents per
algorithm; each path's measured points of one sweep fit one rate (the geometric mean of
MACs / seconds over the points), and `model_ms` = MACs / rate. A path whose points lie on
its curve scales as the model says; the fitted rate itself is `model_gmacs`. An auto
path is predicted with the rate of the concrete path it ran at each point (its twin).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

from norm_fast import dispatch

N_VALUES = (1, 2, 4, 8, 16)
N_SWEEP_SHAPE = "resnet34-resnet18"
BATCH_SWEEPS: Dict[str, Tuple[int, ...]] = {
    "resnet34-resnet18": (2, 4, 8, 16, 32, 64, 128, 256),
    "vgg13-vgg8": (4, 8, 16, 32, 64, 128, 256),
}


def model_algorithm(rec: dict) -> str:
    """The cost-model entry of what ran: "literal", "direct" or "decomposed"."""
    if (rec.get("backend"), rec.get("algorithm")) == ("torch", "direct"):
        return "literal"
    return rec.get("algorithm") or "literal"


def model_macs(rec: dict) -> float:
    cost = dispatch.cost_model(rec["batch"], rec["student_channels"], rec["teacher_channels"],
                               rec["height"], rec["width"], rec["n"], rec["device"])
    return cost[model_algorithm(rec)]


def _ok(rec: dict) -> bool:
    return rec.get("status") == "ok" and rec.get("time_ms")


def add_model(rows: Sequence[dict]) -> None:
    """Add model_macs, model_gmacs (fitted rate) and model_ms to every sweep row."""
    groups: Dict[Tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["sweep"], r["shape"], r["dtype"], r["pass"], r["path"]), []).append(r)
    rates: Dict[Tuple, float] = {}
    for key, rs in groups.items():
        for r in rs:
            r["model_macs"] = model_macs(r)
        pts = [r for r in rs if _ok(r) and not r.get("same_as")]
        if pts:
            rates[key] = math.exp(sum(math.log(r["model_macs"] / (1e-3 * r["time_ms"]))
                                      for r in pts) / len(pts))
    for key, rs in groups.items():
        for r in rs:
            rate = rates.get(key)
            if r.get("same_as"):               # auto: the rate of the path it ran
                rate = rates.get(key[:4] + (r["same_as"],))
            r["model_gmacs"] = None if rate is None else rate / 1e9
            r["model_ms"] = None if rate is None else 1e3 * r["model_macs"] / rate


def growth(rows: Sequence[dict], path: str, key: str, lo: int, hi: int,
           field: str = "time_ms") -> Tuple[float, float]:
    """(measured, modelled) ratio of `field` between `key`=hi and `key`=lo for one path."""
    at = {r[key]: r for r in rows if r["path"] == path and _ok(r)}
    if lo not in at or hi not in at:
        return float("nan"), float("nan")
    meas = at[hi][field] / at[lo][field]
    mod = (at[hi]["model_ms"] / at[lo]["model_ms"]) if at[lo].get("model_ms") else float("nan")
    return meas, mod
