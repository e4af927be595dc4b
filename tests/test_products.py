"""Operand rounding and emulated products (norm_fast/ops/products.py) against an
independent frexp reference, ties included."""
from __future__ import annotations

import math

import pytest
import torch

from norm_fast.ops import products


def frexp_round(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded to `bits` significant bits (the implicit one included), round half to
    even, float32's exponent range (quantum fixed below the smallest normal): by frexp."""
    out = []
    for v in x.double().tolist():
        if not math.isfinite(v) or v == 0.0:
            out.append(v)
            continue
        m, e = math.frexp(v)                        # v = m 2^e, 0.5 <= |m| < 1
        q = max(e, -125) - bits                     # the quantum's exponent
        out.append(round(v / 2.0 ** q) * 2.0 ** q)  # Python's round: half to even
    return torch.tensor(out, dtype=torch.float64).to(x.dtype if x.dtype != torch.float32
                                                     else torch.float32)


def sample(n=20000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-40, 40, (n,), generator=gen))
    # exact ties of TF32: 11 significant bits plus a half
    ties = (torch.randint(1024, 2048, (256,), generator=gen).double() + 0.5) * 2.0 ** -7
    tiny = torch.tensor([1e-40, -3e-39, 2 ** -130, 1.5 * 2 ** -136, 2.5 * 2 ** -136])
    big = torch.tensor([3.4e38, -3.3e38, 65504.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11])
    return torch.cat([x, ties.float(), -ties.float(), tiny, big])


def test_round_tf32_matches_frexp_reference():
    x = sample()
    got = products.round_tf32(x)
    want = frexp_round(x, 11)
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want[finite].float())
    assert torch.isinf(got[~finite]).all()   # rounding past float32's max overflows, as RNE


def test_round_tf32_keeps_special_values():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    got = products.round_tf32(x)
    assert torch.isinf(got[:2]).all() and torch.isnan(got[2]) and (got[3:] == 0).all()
    assert torch.signbit(got[4])


def test_round_bfloat16_matches_frexp_reference():
    x = sample(seed=1)
    x = x[x.abs() < 1e38]
    got = products.round_to(x, "bfloat16")
    want = frexp_round(x, 8).float()
    assert torch.equal(got, want)


def test_split_tf32_carries_22_bits():
    x = sample(seed=2)
    x = x[(x.abs() < 1e38) & (x.abs() > 1e-30)]
    hi, lo = products.split_tf32(x)
    assert torch.equal(products.round_tf32(hi), hi) and torch.equal(products.round_tf32(lo), lo)
    rel = ((hi.double() + lo.double()) - x.double()).abs() / x.double().abs()
    assert rel.max() <= 2.0 ** -21


@pytest.mark.parametrize("precision,bound", [("tf32", 2 ** -10), ("tf32x3", 2 ** -19),
                                             ("bfloat16", 2 ** -7), ("ieee", 2 ** -20)])
def test_emulated_products_err_at_their_precision(precision, bound):
    """a @ b in each precision against float64: the error sits at the operands' rounding
    (and no lower for the lossy ones: the emulation really rounds)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 96, generator=gen), torch.randn(96, 80, generator=gen)
    truth = a.double() @ b.double()
    err = float(((products.mm(a, b, precision).double() - truth).abs().max()
                 / truth.abs().max()))
    assert err <= bound
    if precision in ("tf32", "bfloat16"):
        assert err >= bound / 64


def test_conv1x1_backward_matches_autograd_in_ieee_and_emulates_tf32():
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 8, 5, 5, generator=gen), torch.randn(6, 8, generator=gen)
    g = torch.randn(3, 6, 5, 5, generator=gen)
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    (products.conv1x1(xi, wi, "tf32") * g).sum().backward()
    gi, gw, gb = products.conv1x1_backward(g, x, w, True, True, True, "tf32")
    assert torch.equal(xi.grad, gi) and torch.equal(wi.grad, gw.view(6, 8))
    r = products.round_tf32
    assert torch.allclose(gi, torch.einsum("oc,bohw->bchw", r(w), r(g)), rtol=1e-5, atol=1e-5)
    assert torch.allclose(gb, g.sum(dim=(0, 2, 3)))


def test_override_names_products_and_precisions():
    from norm_fast import precision as plan
    with pytest.raises(ValueError, match="product must be one of"):
        with plan.override({"nope": "tf32"}):
            pass
    with pytest.raises(ValueError, match="precision of gram"):
        with plan.override({"gram": "tf16"}):
            pass
    with plan.override({"gram": "tf32"}):
        assert plan.of("ieee", "gram") == "tf32"
    assert plan.of("ieee", "gram") == "float64"
