"""The P-sized NORM kernels as differentiable `torch.library` custom ops.

Registering them as custom ops (schema, fake implementation, autograd formula) makes
them opaque-but-known to `torch.compile` (no graph break) and lets the backward itself be
a custom op. Each op takes the backend name of the caller's `dispatch.Plan` (a custom op
cannot take a Python object) and calls that kernel set from `dispatch.REGISTRY`, so every
backend shares one autograd formula.

    moments(x, backend, policy)    -> (mean (C,), cov (C, C))        docs/design.md s.3
    expand_mse(x, t, a, b, shift, n, store_error, backend, policy)
                                   -> (sum_i ||a_i (x - shift) + b_i - t||^2, error or empty)
(policy: the precision policy of the caller's plan; each op runs its products in the
precision `norm_fast/precision.PLAN` gives them under it: the Gram "gram", the residual
(store_error) "residual" and "residual_grad", the direct pass "direct" and "direct_grad".)
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import precision as plan
from .dispatch import REGISTRY
from .ops.spec import compute_dtype


def _kernels(backend: str):
    """The kernel set the plan named (availability was checked by `dispatch.resolve`)."""
    return REGISTRY[backend][0]


# --- moments ----------------------------------------------------------------------------
@torch.library.custom_op("norm_fast::moments", mutates_args=())
def moments(x: Tensor, backend: str, policy: str) -> Tuple[Tensor, Tensor]:
    """x (B, C, L) -> mean (C,), biased covariance (C, C), in the compute dtype."""
    mean, cov = _kernels(backend).moments(x, plan.of(policy, "gram"))
    return mean, cov


@moments.register_fake
def _moments_fake(x, backend, policy):
    C = x.shape[1]
    cdt = compute_dtype(x.dtype)
    return x.new_empty((C,), dtype=cdt), x.new_empty((C, C), dtype=cdt)


@torch.library.custom_op("norm_fast::moments_backward", mutates_args=())
def moments_backward(x: Tensor, mean: Tensor, grad_mean: Optional[Tensor],
                     grad_cov: Optional[Tensor], backend: str, policy: str) -> Tensor:
    return _kernels(backend).moments_backward(x, mean, grad_mean, grad_cov,
                                              plan.of(policy, "gram_grad"))


@moments_backward.register_fake
def _moments_backward_fake(x, mean, grad_mean, grad_cov, backend, policy):
    return x.new_empty(x.shape)  # contiguous, as every kernel set returns it


def _moments_setup(ctx, inputs, output):
    x, backend, policy = inputs
    ctx.backend, ctx.policy = backend, policy
    ctx.save_for_backward(x, output[0])


def _moments_bwd(ctx, grad_mean, grad_cov):
    x, mean = ctx.saved_tensors
    return moments_backward(x, mean, grad_mean, grad_cov, ctx.backend, ctx.policy), None, None


moments.register_autograd(_moments_bwd, setup_context=_moments_setup)


# --- expand + N-segment squared error ------------------------------------------------------
@torch.library.custom_op("norm_fast::expand_mse", mutates_args=())
def expand_mse(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor], n: int,
               store_error: bool, backend: str, policy: str) -> Tuple[Tensor, Tensor]:
    """Sum over the n segments of ||a_i (x - shift) + b_i - t||^2 (0-dim, compute dtype).

    x (B, C_s, L), t (B, C_t, L), a (n*C_t, C_s), b (n*C_t,), shift (C_s,) or None.
    With store_error (n == 1) also returns the error (B, C_t, L); else an empty tensor.
    """
    product = "residual" if store_error else "direct"
    sq, err = _kernels(backend).expand_mse_forward(x, t, a, b, shift, n, store_error,
                                                   precision=plan.of(policy, product))
    return sq, err


@expand_mse.register_fake
def _expand_mse_fake(x, t, a, b, shift, n, store_error, backend, policy):
    cdt = compute_dtype(x.dtype)
    err_shape = t.shape if store_error else (0,)
    return x.new_empty((), dtype=cdt), x.new_empty(err_shape, dtype=cdt)


@torch.library.custom_op("norm_fast::expand_mse_backward", mutates_args=())
def expand_mse_backward(grad: Tensor, x: Tensor, t: Tensor, a: Tensor, b: Tensor,
                        shift: Optional[Tensor], n: int, err: Optional[Tensor],
                        grad_mask: List[bool], backend: str, policy: str
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    product = "residual" if err is not None else "direct"   # the stored error: the residual
    out = _kernels(backend).expand_mse_backward(
        grad, x, t, a, b, shift, n, err, list(grad_mask), precision=plan.of(policy, product),
        grad_precision=plan.of(policy, product + "_grad"))
    # Custom-op outputs may not alias each other: give each unwanted gradient its own
    # empty tensor (kernel sets may share one).
    return tuple(g if g.numel() else g.new_empty((0,)) for g in out)


@expand_mse_backward.register_fake
def _expand_mse_backward_fake(grad, x, t, a, b, shift, n, err, grad_mask, backend,
                              policy):
    cdt = compute_dtype(x.dtype)
    want_x, want_t, want_a, want_b, want_s = grad_mask
    empty = x.new_empty((0,), dtype=cdt)
    return (
        x.new_empty(x.shape) if want_x else empty,   # contiguous, as every kernel set
        t.new_empty(t.shape) if want_t else empty,   # returns them
        a.new_empty(a.shape, dtype=cdt) if want_a else empty,
        b.new_empty(b.shape, dtype=cdt) if want_b else empty,
        x.new_empty((x.shape[1],), dtype=cdt) if (want_s and shift is not None) else empty,
    )


def _expand_mse_setup(ctx, inputs, output):
    x, t, a, b, shift, n, store_error, backend, policy = inputs
    ctx.n, ctx.backend, ctx.policy, ctx.has_shift = n, backend, policy, shift is not None
    ctx.save_for_backward(x, t, a, b, shift, output[1] if store_error else None)
    ctx.mark_non_differentiable(output[1])  # the stored error is a by-product, not a result


def _expand_mse_bwd(ctx, grad_sq, grad_err):
    x, t, a, b, shift, err = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:5])
    if not any(need):
        return (None,) * 9
    dx, dt, da, db, dshift = expand_mse_backward(grad_sq, x, t, a, b, shift, ctx.n, err, need,
                                                 ctx.backend, ctx.policy)
    grads = [g if want else None for g, want in zip((dx, dt, da, db, dshift), need)]
    if not ctx.has_shift:
        grads[4] = None
    return (*grads, None, None, None, None)


expand_mse.register_autograd(_expand_mse_bwd, setup_context=_expand_mse_setup)


# --- the fused training step's ops (norm_fast/train_step.py) -----------------------------
@torch.library.custom_op("norm_fast::expand_error", mutates_args=())
def expand_error(x: Tensor, t: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor], n: int,
                 g2: Tensor, backend: str, policy: str) -> Tensor:
    """g2 * the expanded error (B, n*C_t, L): `ops/eager.expand_error`, its product the
    plan's "direct"."""
    return _kernels(backend).expand_error(x, t, a, b, shift, n, g2,
                                          precision=plan.of(policy, "direct"))


@expand_error.register_fake
def _expand_error_fake(x, t, a, b, shift, n, g2, backend, policy):
    half = x.dtype in (torch.float16, torch.bfloat16)
    return x.new_empty((x.shape[0], a.shape[0], x.shape[2]),
                       dtype=x.dtype if half else compute_dtype(x.dtype))



@torch.library.custom_op("norm_fast::centred_moments", mutates_args=())
def centred_moments(x: Tensor, backend: str, policy: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B, C, L) -> (xc, origin, scales, mean, cov): `ops/eager.centred_moments`, the
    Gram in the plan's "gram" precision."""
    return tuple(_kernels(backend).centred_moments(x, plan.of(policy, "gram")))


@centred_moments.register_fake
def _centred_moments_fake(x, backend, policy):
    B, C, L = x.shape
    cdt = compute_dtype(x.dtype)
    return (x.new_empty((B, C, L)), x.new_empty((C,), dtype=cdt), x.new_empty((2,), dtype=cdt),
            x.new_empty((C,), dtype=cdt), x.new_empty((C, C), dtype=cdt))



# Not differentiable themselves: the fused training step's backward calls the second.
@torch.library.custom_op("norm_fast::centre_segments", mutates_args=())
def centre_segments(W1: Tensor, n: int, backend: str) -> Tensor:
    """[W1_i - Wbar; Wbar] (O + C_t, C): `ops/eager.centre_segments`."""
    return _kernels(backend).centre_segments(W1, n)


@centre_segments.register_fake
def _centre_segments_fake(W1, n, backend):
    O, C = W1.shape
    return W1.new_empty((O + O // n, C))


@torch.library.custom_op("norm_fast::expansion_forward", mutates_args=())
def expansion_forward(W1: Tensor, W1S: Tensor, WbS: Tensor, gamma: Tensor, beta: Tensor,
                      origin: Tensor, mean: Tensor, sigma: Tensor, inv: Tensor, eps: float,
                      unbias: float, part_scale: float, n: int, decomposed: bool,
                      backend: str) -> List[Tensor]:
    """(a1, r1, A, mean1, var1u, c1, Abar, DS, Aerr, rb, rcoef, db, part):
    `ops/eager.expansion_forward`."""
    return list(_kernels(backend).expansion_forward(W1, W1S, WbS, gamma, beta, origin, mean,
                                                    sigma, inv, eps, unbias, part_scale, n,
                                                    decomposed))


@expansion_forward.register_fake
def _expansion_forward_fake(W1, W1S, WbS, gamma, beta, origin, mean, sigma, inv, eps, unbias,
                            part_scale, n, decomposed, backend):
    O, C = W1.shape
    T = O // n
    if decomposed:
        rest = [W1.new_empty((T, C)), W1.new_empty((O, C)), W1.new_empty((T, C)),
                W1.new_empty((T,)), W1.new_empty((T,)), W1.new_empty((O,)), W1.new_empty((T,))]
    else:
        rest = [W1.new_empty((0,)) for _ in range(7)]
    return [W1.new_empty((O,)), W1.new_empty((O,)), W1.new_empty((O, C)),
            *(W1.new_empty((O,)) for _ in range(3)), *rest]


@torch.library.custom_op("norm_fast::expansion_backward", mutates_args=())
def expansion_backward(gA: Tensor, gA2: Tensor, gAbar: Tensor, gsum: Tensor, g_out: Tensor,
                       coef: float, W1: Tensor, W1S: Tensor, WbS: Tensor, a1: Tensor,
                       r1: Tensor, A: Tensor, Abar: Tensor, DS: Tensor, db: Tensor,
                       mean: Tensor, P: int, n: int, decomposed: bool, backend: str
                       ) -> List[Tensor]:
    """(gW1, gW1S, ggamma, gbeta, wv): `ops/eager.expansion_backward`."""
    return list(_kernels(backend).expansion_backward(gA, gA2, gAbar, gsum, g_out, coef, W1,
                                                     W1S, WbS, a1, r1, A, Abar, DS, db, mean,
                                                     P, n, decomposed))


@expansion_backward.register_fake
def _expansion_backward_fake(gA, gA2, gAbar, gsum, g_out, coef, W1, W1S, WbS, a1, r1, A, Abar,
                             DS, db, mean, P, n, decomposed, backend):
    O, C = W1.shape
    return [W1.new_empty((O, C)), W1.new_empty((O, C)), W1.new_empty((O,)),
            W1.new_empty((O,) if decomposed else (0,)), W1.new_empty((O,))]


@torch.library.custom_op("norm_fast::decomposed_total", mutates_args=())
def decomposed_total(part: Tensor, resid: Tensor, Aerr: Tensor, G4: Tensor, rcoef: Tensor,
                     SR: Tensor, ncoef: float, P: int, backend: str) -> Tensor:
    """The decomposed loss from its parts: `ops/eager.decomposed_total`."""
    return _kernels(backend).decomposed_total(part, resid, Aerr, G4, rcoef, SR, ncoef, P)


@decomposed_total.register_fake
def _decomposed_total_fake(part, resid, Aerr, G4, rcoef, SR, ncoef, P, backend):
    return part.new_empty(())
