"""Step 4 of `make gpu-check`: every path against a float64 literal, at the real shapes.

For resnet34->resnet18 (B=256, 512->512, 7x7) and resnet50->mobilenet (B=256, 2048->1024,
7x7), N=8, BatchNorm on, training mode, detach_teacher=False (so f_t has a gradient):
the truth is NORM(backend="torch") -- the literal module -- run in float64 on the device.
Every candidate starts from the same state (randomised BatchNorm affine parameters and
running statistics), takes the same inputs rounded to its dtype (float32; or bfloat16
under autocast with float32 parameters) and runs one forward and one backward from the
loss (gradient 1) and the features (a fixed random gradient g):
    loss, features, grad f_s, grad f_t, the gradient of every parameter, and every
    BatchNorm running statistic after the step,
each compared with the truth by err = max|got - truth| / max|truth| (NaN fails).
The literal itself in that precision (path "reference") gives the yardstick lit_err; a
norm_fast path passes a quantity when
    err <= 4 * lit_err + FLOOR[dtype]      FLOOR = 2e-6 (float32, 16 ulps), 1e-3 (bfloat16)
(the floor covers quantities the literal happens to get to rounding level).

Rows go to correctness.json, one JSON object a line, rewritten after every path:
    {"verdict": "PASS"|"FAIL"|"REF"|"SKIP", "shape", "batch", "dtype", "path", "backend",
     "algorithm", "quantity", "err", "literal_err", "bound", "error"}
`--backends` restricts the run to some backends (gpu_check.py runs torch/triton while the
C++/CUDA extension builds, then cpp/cuda/auto); rows already in the file are kept.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch

from norm_fast import NORM, dispatch

from . import gpu_common as C
from .paths import PathSpec

FLOOR = {"float32": 2e-6, "bfloat16": 1e-3}
FACTOR = 4.0
RUNNING_STATS = ("running_mean", "running_var")


def rel_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """max |got - truth| / max |truth|, in float64 (NaN if got has a NaN)."""
    got, truth = got.detach().double(), truth.detach().double()
    return float((got - truth).abs().max() / truth.abs().max().clamp_min(1e-30))


def _randomise_state(module: NORM, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm parameters and running statistics (not 1/0 as initialised)."""
    dev = module.expand.weight.device
    with torch.no_grad():
        for bn in (module.expand_bn, module.contract_bn):
            c = bn.num_features
            rnd = lambda *s: torch.rand(*s, generator=gen, device=dev, dtype=torch.float64)
            bn.weight.copy_(rnd(c) + 0.5)
            bn.bias.copy_((rnd(c) - 0.5))
            bn.running_mean.copy_(rnd(c) - 0.5)
            bn.running_var.copy_(rnd(c) + 0.5)


def _problem(shape, device: torch.device, seed: int = 0):
    """(state dict in float64, f_s, f_t, g): post-ReLU-like non-negative features."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    ref = NORM(shape.student_channels, shape.teacher_channels, shape.n,
               detach_teacher=False, backend="torch", algorithm="direct")
    ref = ref.to(device=device, dtype=torch.float64)
    _randomise_state(ref, gen)
    randn = lambda s: torch.randn(s, generator=gen, device=device, dtype=torch.float64)
    f_s = torch.relu(randn(shape.student_size()))
    f_t = torch.relu(randn(shape.teacher_size()))
    g = randn(shape.student_size())
    return {k: v.clone() for k, v in ref.state_dict().items()}, f_s, f_t, g


def run_once(backend: str, algorithm: str, shape, state: dict, f_s, f_t, g,
             dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Every compared quantity of one forward + backward. dtype None: float64 (the truth);
    float32; bfloat16 (autocast, float32 parameters)."""
    device = f_s.device
    mod = NORM(shape.student_channels, shape.teacher_channels, shape.n,
               detach_teacher=False, backend=backend, algorithm=algorithm)
    mod = mod.to(device=device, dtype=torch.float64 if dtype is None else torch.float32)
    mod.load_state_dict(state)
    mod.train()
    in_dtype = torch.float64 if dtype is None else dtype
    x = f_s.detach().to(in_dtype, copy=True).requires_grad_(True)
    t = f_t.detach().to(in_dtype, copy=True).requires_grad_(True)
    if dtype == torch.bfloat16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            feats, loss = mod(x, t)
    else:
        feats, loss = mod(x, t)
    torch.autograd.backward((loss, feats), (None, g.to(feats.dtype)))
    out = {"loss": loss.detach(), "features": feats.detach(), "grad f_s": x.grad,
           "grad f_t": t.grad}
    for name, p in mod.named_parameters():
        out[f"grad {name}"] = p.grad
    for name, buf in mod.named_buffers():
        if name.rsplit(".", 1)[-1] in RUNNING_STATS:
            out[name] = buf.detach()
    return out


def _errors(got: Dict[str, torch.Tensor], truth: Dict[str, torch.Tensor]) -> Dict[str, float]:
    errs = {}
    for k, want in truth.items():
        have = got.get(k)
        errs[k] = float("nan") if have is None else rel_err(have, want)
    return errs


def _row(verdict, shape, dtype_name, path: PathSpec, backend, algorithm, quantity,
         err=None, lit=None, bound=None, error=None) -> dict:
    return {"verdict": verdict, "shape": shape.name, "batch": shape.batch, "dtype": dtype_name,
            "path": path.name, "backend": backend, "algorithm": algorithm,
            "quantity": quantity, "err": err, "literal_err": lit, "bound": bound,
            "error": error}


def _resolved(path: PathSpec, shape, device_type: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = dispatch.resolve(path.backend, path.algorithm, device_type, shape.batch,
                                shape.student_channels, shape.teacher_channels,
                                shape.height, shape.width, shape.n)
    return plan.backend, plan.algorithm


def check_shape(shape, dtype_names, candidates: List[PathSpec], with_reference: bool,
                device: torch.device, deadline: C.Deadline, rows: List[dict], save) -> None:
    """Append the rows of one shape (all dtypes, all candidates) to `rows`."""
    state, f_s, f_t, g = _problem(shape, device)
    truth = run_once("torch", "direct", shape, state, f_s, f_t, g, None)
    ref = PathSpec("reference", "torch", "direct")
    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        lit = _errors(run_once("torch", "direct", shape, state, f_s, f_t, g, dtype), truth)
        if with_reference:
            rows += [_row("REF", shape, dtype_name, ref, "torch", "literal", q, e)
                     for q, e in lit.items()]
        for path in candidates:
            backend, algorithm = _resolved(path, shape, device.type)
            if deadline.spent():
                rows.append(_row("SKIP", shape, dtype_name, path, backend, algorithm, "*",
                                 error="skipped: budget"))
                continue
            try:
                errs = _errors(run_once(path.backend, path.algorithm, shape, state, f_s, f_t,
                                        g, dtype), truth)
            except Exception as exc:  # a crash is a failure of every quantity
                rows.append(_row("FAIL", shape, dtype_name, path, backend, algorithm, "*",
                                 error=C.error_text(exc)))
                C.say("correctness", f"{shape.name} {dtype_name} {path.name}: {C.error_text(exc)}")
                continue
            fails = 0
            for q, e in errs.items():
                bound = FACTOR * lit[q] + FLOOR[dtype_name]
                ok = math.isfinite(e) and e <= bound
                fails += not ok
                rows.append(_row("PASS" if ok else "FAIL", shape, dtype_name, path, backend,
                                 algorithm, q, e, lit[q], bound))
            C.say("correctness", f"{shape.name} B={shape.batch} {dtype_name} {path.name} "
                  f"({backend}/{algorithm}): {len(errs) - fails}/{len(errs)} PASS"
                  + (f", worst {max(errs, key=lambda k: errs[k] / (FACTOR * lit[k] + FLOOR[dtype_name]))}"
                     if fails else ""))
            save()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: Optional[List[str]] = None) -> int:
    args, device, deadline = C.step_args("benchmarks.gpu_correctness", argv, [
        ("--backends", "comma list of backends, 'auto' for norm_fast-auto (default: all)")])
    wanted = [b for b in args.backends.split(",") if b] or None
    path = C.out_path(args.out, "correctness.json")
    rows: List[dict] = C.read_json(path, [])
    with_reference = not any(r.get("verdict") == "REF" for r in rows)
    candidates = C.norm_fast_paths(device.type, wanted)
    dtype_names = list(C.DTYPE_NAMES)
    from .steps import bf16_supported
    ok, why = bf16_supported(device)
    if not ok and not C.dry_run():
        dtype_names.remove("bfloat16")
        C.say("correctness", f"bfloat16 skipped: {why}")
    C.say("correctness", f"paths: {', '.join(x.name for x in candidates) or 'none'}")

    def save():
        C.write_rows(path, rows)

    for shape in C.run_shapes(C.CORRECTNESS_SHAPES):
        if deadline.spent():
            rows.append(_row("SKIP", shape, "*", PathSpec("*", "*", "*"), None, None, "*",
                             error="skipped: budget"))
            continue
        check_shape(shape, dtype_names, candidates, with_reference, device, deadline, rows, save)
        save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
