"""The emulation harness of the precision plan (norm_fast/precision.py, issue 19).

Every fast form runs on CPU through the eager kernel set with each product of the plan
emulated in its planned precision (norm_fast/ops/products.py: TF32 / 3xTF32 / 16-bit
operands, float32 sums); the literal reference runs with its two convolutions (and their
backward products) emulated in the literal's own precision under the same policy
(tests/literal.py `LiteralFT.precision`). Both against the float64 literal.

Cases (B=16, C_s=48, C_t=64, 7x7, N=8 unless said):
    random      Gaussian f_s, an independent teacher, random BatchNorm parameters
    relu        post-ReLU f_s (half exact zeros, a large mean)
    lowrank     f_s of rank 6 across channels plus 1e-3 noise
    conv3/conv4 every segment converged (tests/test_precision.all_converged, rel 1e-3 / 1e-4)
    rankdef     f_s constant over each map (rank <= B = 16 < C_s): the covariance is singular
Routes: the fused training step (BatchNorm, training, teacher detached) decomposed and
direct, and the composed route in eval mode (decomposed).
Objectives: the loss, <features, g>, and both.

`python tests/precision_plan_harness.py [policy ...]` prints the worst ratio per policy,
case and quantity (the closing note's table).
"""
from __future__ import annotations

import itertools
import sys

import torch

from norm_fast import NORM, precision as plan

from literal import LiteralFT, rel_err
from test_precision import ALL_SHAPE, EPS32, all_converged, permute_positions, rms

CASES = ("random", "relu", "lowrank", "conv3", "conv4", "rankdef")
ROUTES = ("fused-decomposed", "fused-direct", "eval-decomposed")
OBJECTIVES = ("loss", "features", "both")
POLICIES = ("tf32", "tf32x3", "bfloat16")
SEEDS = (0, 1)
NAMES = ["value", "grad f_s", "grad expand.weight", "grad expand_bn.weight",
         "grad expand_bn.bias", "grad contract.weight", "grad contract_bn.weight",
         "grad contract_bn.bias"]
BOUND = 4.0


def make_case(case: str, seed: int, train: bool):
    """(float64 LiteralFT, f_s, f_t, g) for one case and seed."""
    if case in ("conv3", "conv4"):
        return all_converged("cpu", seed=seed, train=train,
                             rel=1e-3 if case == "conv3" else 1e-4)
    B, C_s, C_t, H, W, n = ALL_SHAPE
    gen = torch.Generator().manual_seed(100 + seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    lit = LiteralFT(C_s, C_t, n).double()
    with torch.no_grad():
        lit.expand.weight.copy_(randn(n * C_t, C_s, 1, 1) / C_s ** 0.5)
        lit.contract.weight.copy_(randn(C_s, n * C_t, 1, 1) / (n * C_t) ** 0.5)
        for bn in (lit.expand_bn, lit.contract_bn):
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) + .5)
            bn.bias.copy_(randn(bn.num_features) * 0.5)
            bn.running_mean.copy_(randn(bn.num_features) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen,
                                            dtype=torch.float64) + 0.5)
    if case == "random":
        f_s = randn(B, C_s, H, W)
    elif case == "relu":
        f_s = torch.relu(randn(B, C_s, H, W))
    elif case == "lowrank":
        f_s = torch.einsum("kc,bkhw->bchw", randn(6, C_s), randn(B, 6, H, W))
        f_s = f_s + 1e-3 * randn(B, C_s, H, W)
    elif case == "rankdef":
        f_s = randn(B, C_s, 1, 1).expand(B, C_s, H, W).contiguous()
    else:
        raise ValueError(case)
    f_t = randn(B, C_t, H, W)
    return lit, f_s, f_t, randn(B, C_s, H, W)


def _run(forward, params, f_s, f_t, g, objective):
    f_s = f_s.clone().requires_grad_()
    feats, loss = forward(f_s, f_t)
    total = {"loss": loss, "features": (feats * g).sum(),
             "both": loss + (feats * g).sum()}[objective]
    total.backward()
    value = loss if objective == "loss" else feats
    return [value.detach(), f_s.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def errors(policy: str, case: str, route: str, objective: str, seed: int, order: str):
    """(ours, literal): relative errors of each quantity (NAMES) against float64, ours on
    the route under `policy`, the literal with its convolutions in the policy's own
    precision; None where the truth is zero."""
    train = not route.startswith("eval")
    lit, f_s, f_t, g = make_case(case, seed, train)
    if order == "permuted":
        f_s, f_t, g = permute_positions(seed, f_s, f_t, g)
    B, C_s, C_t, H, W, n = ALL_SHAPE
    sd = lit.state_dict()

    def literal(dtype, prec):
        m = LiteralFT(C_s, C_t, n).to(dtype)
        m.load_state_dict(sd)
        m.precision = prec
        m.train(train)
        return _run(m, list(m.parameters()), f_s.to(dtype), f_t.to(dtype), g.to(dtype),
                    objective)

    truth = literal(torch.float64, "ieee")
    ref = literal(torch.float32, plan.LITERAL[policy])
    mod = NORM(C_s, C_t, n, backend="torch").float().train(train)
    mod.load_state_dict(sd)
    algo = route.split("-")[1]
    fwd = lambda a, b: mod._fast_forward(a, b, "torch", algo, None, policy)
    ours = _run(fwd, list(mod.parameters()), f_s.float(), f_t.float(), g.float(), objective)

    def errs(got):
        return [None if not t.abs().max() > 0 else rel_err(a, t) for a, t in zip(got, truth)]
    return errs(ours), errs(ref)


def measure(policy: str, case: str, route: str, objective: str, seeds=SEEDS):
    """{(seed, order): (ours, literal)}"""
    return {(s, o): errors(policy, case, route, objective, s, o)
            for s in seeds for o in ("given", "permuted")}


def floor(policy: str) -> float:
    """Four ulps of the quantity in the policy's own rounding: below it both errors are
    the rounding of the result itself (float32 results; 16-bit outputs in bfloat16)."""
    return 4 * (2.0 ** -8 if policy in ("bfloat16", "float16") else EPS32)


def worst(table, policy):
    """[(ratio, name, draw, ours, literal)] per quantity: the loss value as RMS over the
    draws, every other quantity per draw; ratio = ours / (literal), the bound 4."""
    out = []
    draws = list(table)
    fl = floor(policy)
    for k, name in enumerate(NAMES):
        pairs = [(d, table[d][0][k], table[d][1][k]) for d in draws
                 if table[d][1][k] is not None and table[d][0][k] is not None]
        if not pairs:
            continue
        if k == 0:
            mine, ref = rms(p[1] for p in pairs), rms(p[2] for p in pairs)
            out.append((mine / (ref + fl / BOUND), name + " (RMS)", "all", mine, ref))
        else:
            d, mine, ref = max(pairs, key=lambda p: p[1] / (p[2] + fl / BOUND))
            out.append((mine / (ref + fl / BOUND), name, d, mine, ref))
    return out


def failures(policy, case, route, objective, seeds=SEEDS):
    table = measure(policy, case, route, objective, seeds)
    return [f"{policy} {case} {route} {objective} {name} {draw}: {mine:.2e} vs literal "
            f"{ref:.2e} ({r:.1f}x)"
            for r, name, draw, mine, ref in worst(table, policy) if r > BOUND]


def summary(policies=POLICIES):
    """Worst ratio per policy x case (over routes, objectives, quantities), and where."""
    for policy in policies:
        print(f"policy {policy}: plan {plan.table(policy)}")
        for case in CASES:
            best = (0.0, "")
            for route, objective in itertools.product(ROUTES, OBJECTIVES):
                for r, name, draw, mine, ref in worst(measure(policy, case, route, objective),
                                                      policy):
                    if r > best[0]:
                        best = (r, f"{route} {objective} {name} {mine:.1e} (lit {ref:.1e})")
            print(f"  {case:8s} worst {best[0]:5.2f}x  {best[1]}", flush=True)


if __name__ == "__main__":
    summary(tuple(sys.argv[1:]) or POLICIES)
