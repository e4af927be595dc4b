"""`NORM`: the Feature Transform and the N-to-One matching loss as one nn.Module."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, algebra, custom_ops, dispatch, distributed, segment_loss, train_step
from . import precision as plan
from .ops import products
from .ops.spec import compute_dtype, gemm_precision
from .reference import reference_forward


class NORM(nn.Module):
    r"""N-to-One Representation Matching (Feature Transform + N-segment MSE).

    Args:
        student_channels: C_s, channels of the student's last feature map.
        teacher_channels: C_t, channels of the teacher's feature map.
        n: N, the number of teacher-sized segments the FT expands to (default 8).
        batchnorm: BatchNorm after each 1x1 conv (the reference FT); False gives the
            paper's "two linear layers".
        residual: add f_s to the FT output (identity residual).
        segment_reduction: "sum" (the reference code: sum over segments of each segment's
            MSE) or "mean" (the paper's 1/N form).
        detach_teacher: stop the loss's gradient at f_t (the reference behaviour).
        backend: "auto", "torch" (the literal reference), "triton", "cpp", "cuda".
        algorithm: "auto", "direct" or "decomposed" (see `norm_fast.dispatch`).
        precision: of the float32 products that replace the literal's 1x1 convolutions, on
            CUDA: "auto" (default) follows the literal's convolutions, TF32 exactly when
            torch.backends.cudnn.allow_tf32 is True (PyTorch's default); "ieee", "tf32"
            or "tf32x3" (Triton only; exact elsewhere) override it. The covariance,
            variances and spread are exact whatever it says (`dispatch.resolve_precision`).
        sync_batchnorm: in training under torch.distributed, normalise with the statistics
            of the global batch (all-reducing the mean and covariance of f_s over
            `process_group`, default the world), as nn.SyncBatchNorm would. The same
            happens when `expand_bn` is an nn.SyncBatchNorm (convert_sync_batchnorm).

    Submodules `expand`, `expand_bn`, `contract`, `contract_bn` hold the same parameters
    and buffers, under the same names, as a literal implementation (docs/design.md section 1), so
    state dicts load both ways with strict=True.

    forward(f_s (B, C_s, H, W), f_t (B, C_t, H, W) or None) -> (features, loss):
        features (B, C_s, H, W), the FT output for the student's pooling + classifier;
        loss, 0-dim, `mse_loss(Y, f_t.repeat(1, n, 1, 1)) * n` ("sum") or that / n
        ("mean"), float32 for 16-bit inputs; None when f_t is None.
        f_t may have another floating dtype than f_s (a teacher run outside autocast,
        cached features): it is cast to f_s's compute dtype (float32 for 16-bit f_s,
        float64 for float64), so the comparison is made in that precision.
    """

    def __init__(self, student_channels: int, teacher_channels: int, n: int = 8, *,
                 batchnorm: bool = True, residual: bool = True, segment_reduction: str = "sum",
                 detach_teacher: bool = True, backend: str = "auto", algorithm: str = "auto",
                 precision: str = "auto", sync_batchnorm: bool = False, process_group=None):
        super().__init__()
        self.student_channels = _checks.check_channels("student_channels", student_channels)
        self.teacher_channels = _checks.check_channels("teacher_channels", teacher_channels)
        self.n = _checks.check_n(n)
        self.batchnorm = bool(batchnorm)
        self.residual = bool(residual)
        self.segment_reduction = _checks.check_reduction(segment_reduction)
        self.detach_teacher = bool(detach_teacher)
        self.backend = dispatch.check_backend(backend)
        self.algorithm = dispatch.check_algorithm(algorithm)
        self.precision = dispatch.check_precision(precision)
        self.sync_batchnorm = bool(sync_batchnorm)
        self.process_group = process_group
        expanded = self.n * self.teacher_channels
        self.expand = nn.Conv2d(student_channels, expanded, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(expanded) if batchnorm else nn.Identity()
        self.contract = nn.Conv2d(expanded, student_channels, 1, bias=False)
        self.contract_bn = nn.BatchNorm2d(student_channels) if batchnorm else nn.Identity()
        self.last_loss: Optional[Tensor] = None
        self._teacher: Optional[Tensor] = None
        self._hook_handle = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: Kaiming normal (fan_out, relu); BN weight 1, bias 0."""
        for conv in (self.expand, self.contract):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        for bn in (self.expand_bn, self.contract_bn):
            if isinstance(bn, nn.BatchNorm2d):
                bn.reset_parameters()

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels="
                f"{self.teacher_channels}, n={self.n}, batchnorm={self.batchnorm}, residual="
                f"{self.residual}, segment_reduction={self.segment_reduction!r}, "
                f"backend={self.backend!r}, algorithm={self.algorithm!r}"
                + (f", precision={self.precision!r}" if self.precision != "auto" else ""))

    # -------------------------------------------------------------------------------------
    def resolve(self, f_s: Tensor) -> dispatch.Plan:
        """The `dispatch.Plan` (backend, algorithm, kernels, precision) this module runs
        for `f_s`."""
        B, C_s, H, W = f_s.shape
        return dispatch.resolve(self.backend, self.algorithm, f_s.device.type, B, C_s,
                                self.teacher_channels, H, W, self.n, f_s.dtype,
                                getattr(self, "precision", "auto"))

    def forward(self, f_s: Tensor, f_t: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor]]:
        _checks.check_feature_map("f_s", f_s, self.student_channels)
        _checks.check_param_compat(f_s, self.expand.weight, "NORM")
        if f_t is not None:
            _checks.check_feature_map("f_t", f_t, self.teacher_channels)
            f_t = _checks.check_pair(f_s, f_t)
        if self.training and self.batchnorm and f_s.shape[0] * f_s.shape[2] * f_s.shape[3] == 1:
            raise ValueError("BatchNorm in training mode needs more than 1 value per channel, "
                             f"got f_s of shape {tuple(f_s.shape)}")
        plan = self.resolve(f_s)
        sync = self._sync_group()
        if plan.literal and sync is None:
            return reference_forward(self, f_s, f_t)
        # (Synchronised statistics take the moments route even for the literal choice:
        # nn.SyncBatchNorm itself cannot run on CPU tensors.)
        algorithm = "direct" if plan.literal else plan.algorithm
        return self._fast_forward(f_s, f_t, plan.backend, algorithm, sync, plan.precision)

    def _sync_group(self):
        """None, or a 1-tuple holding the process group whose global batch sets the stats."""
        if not (self.training and self.batchnorm):
            return None
        bn = self.expand_bn
        if not (self.sync_batchnorm or isinstance(bn, nn.SyncBatchNorm)):
            return None
        group = distributed.group_of(bn, self.process_group)
        if distributed.sync_world_size(group) <= 1:
            return None
        return (distributed.statistics_group(self, group),)

    def _fast_forward(self, f_s: Tensor, f_t: Optional[Tensor], backend: str, algorithm: str,
                      sync=None, precision: str = "ieee"):
        dev = f_s.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else f_s.dtype
        # The small algebra's forward products exact (cuBLAS float32 on CUDA), whatever
        # torch.backends.cuda.matmul says; the P-sized products set their own precision.
        with torch.autocast(dev, enabled=False), \
                gemm_precision(f_s.device, compute_dtype(f_s.dtype), "ieee"):
            features, loss = self._fast_ft(f_s, f_t, backend, algorithm, sync, precision)
        return features.to(out_dtype), loss

    def _fast_ft(self, f_s: Tensor, f_t: Optional[Tensor], backend: str, algorithm: str,
                 sync=None, precision: str = "ieee"):
        """FT and loss from the moments of f_s (docs/design.md sections 3-4); nothing of
        size N*C_t*P. Y = A (X - shift) + b; features = contraction of Y (+ f_s)."""
        if train_step.eligible(self, f_s, f_t, sync, backend):
            return train_step.run(self, f_s, f_t, backend, algorithm, precision)
        n, C_t = self.n, self.teacher_channels
        cdt = compute_dtype(f_s.dtype)
        W1 = self.expand.weight.reshape(n * C_t, -1).to(cdt)
        W2 = self.contract.weight.reshape(-1, n * C_t).to(cdt)
        bn1, bn2 = (self.expand_bn, self.contract_bn) if self.batchnorm else (None, None)
        st1, st2 = algebra.bn_state(bn1, self.training), algebra.bn_state(bn2, self.training)
        decomposed = algorithm == "decomposed" and f_t is not None
        batch1 = st1 is not None and st1.batch_stats
        n_spread = n if decomposed else 0

        f_in, mom = self._moments(f_s, backend, sync, decomposed or batch1, batch1, precision)
        if batch1:
            exp = algebra.batch_expansion(W1, bn1, st1, mom, n_spread, sync is not None)
        else:
            exp = algebra.fixed_expansion(W1, bn1, mom, n_spread)
        features = self._contraction(f_in, W2, exp, bn2, st2, sync, precision)
        if self.residual:
            # Added apart rather than folded into the map as I + M: in float32 the identity
            # would round away the low bits of M (its entries are small against 1).
            features = features + f_s
        if f_t is None:
            return features, None

        t = (f_t.detach() if self.detach_teacher else f_t).flatten(2)
        if exp.Yc is not None:
            sq = segment_loss.data_sq_sum(t, exp, n)
        elif decomposed:
            sq = segment_loss.decomposed_sq_sum(mom, t, exp, n, backend, precision)
        else:
            sq = segment_loss.direct_sq_sum(f_in.flatten(2), t, exp, n, backend, precision)
        loss = sq / (C_t * f_s.shape[0] * f_s.shape[2] * f_s.shape[3])
        return features, (loss / n if self.segment_reduction == "mean" else loss)

    def _moments(self, f_s: Tensor, backend: str, sync, needed: bool, centre: bool,
                 policy: str = "ieee") -> Tuple[Tensor, Optional[algebra.Moments]]:
        """(the map the P-sized ops read, its `algebra.Moments` or None when not needed).

        With batch statistics (`centre`) the ops read (f_s - origin) / sigma: centred at
        the batch mean, so that the gradients of the folded maps do not cancel (post-ReLU
        maps have large means) and a constant channel is exactly zero, as in the literal
        BatchNorm; scaled by sigma (`algebra.range_scale`, 1 for ordinary inputs) because
        the FT is then invariant to the scale of f_s but for the BatchNorm eps, which
        `algebra.batch_expansion` divides by sigma^2 (docs/design.md section 3).
        Synchronised statistics keep sigma = 1 (every rank would need the same sigma).
        """
        if not needed:
            return f_s, None
        origin = scale = None
        if sync is None:
            scale = algebra.range_scale(f_s)
        unscaled = scale is None or algebra.is_one(scale)
        if not centre and not unscaled:
            # per position (no batch mean): only the range scale, so that the covariance
            # of the decomposed loss cannot overflow
            f_s = f_s * scale.reciprocal().to(f_s.dtype)
        given = f_s
        if centre:
            # The origin is only where the data is centred: every statistic is taken again
            # about the mean of what the kernels read, so the result does not depend on
            # it (no gradient needed) and float32 is enough.
            cdt = compute_dtype(f_s.dtype)
            origin = f_s.detach().mean(dim=(0, 2, 3), dtype=cdt)
            if unscaled:
                centred = f_s - origin[:, None, None]
            else:
                inv = scale.reciprocal().to(cdt)                 # exact: a power of two
                origin = origin * inv
                # one pass: -origin + f_s * inv, in the compute dtype
                centred = torch.addcmul(-origin[:, None, None], f_s, inv)
            # 16-bit maps are stored back in their dtype: the GEMMs reading them stay 16-bit
            f_s = centred if centred.dtype == f_s.dtype else centred.to(f_s.dtype)
        x = f_s.flatten(2)                                       # (B, C_s, L), a view if it can be
        mean, cov = custom_ops.moments(x, backend, policy)
        count = x.shape[0] * x.shape[2]
        g_mean, g_cov = mean, cov
        if sync is not None:
            # every rank centred at its own origin: combine in the raw coordinates
            raw = mean if origin is None else mean + origin
            g_mean, g_cov, count = distributed.global_moments(raw, cov, count, sync[0])
            g_mean = g_mean if origin is None else g_mean - origin
        return f_s, algebra.Moments(x, g_mean, g_cov, mean, cov, count, origin, scale,
                                    _residual_source(given, origin, cov) if unscaled else None)

    def _contraction(self, f_in: Tensor, W2: Tensor, exp: algebra.Expansion,
                     bn2: Optional[nn.Module], st2: Optional[algebra.BNState], sync,
                     policy: str = "ieee") -> Tensor:
        """contract_bn(contract(Y)) from f_in (B, C_s, H, W) without Y: one C_s x C_s map
        per position (docs/design.md section 3). With batch statistics they are taken
        from the map's output itself (C_s x P values, computed anyway): a variance formed
        from data is non-negative and as accurate as the literal's.

        When the expansion's statistics came from its data (P <= C_s: `exp.Yc`), the
        contraction is W2 Yc, the literal's order, at no more cost than forming K = W2 A:
        on a rank-deficient batch some rows of A are scaled by up to gamma/sqrt(eps), and
        K's sums over them cancel (measured: features 26x, gradients 190x the literal's
        error at B=2, 1x1)."""
        if (exp.Yc is not None and exp.shift is not None and st2 is not None
                and st2.batch_stats and sync is None):
            B, C, H, W = f_in.shape
            uc = (W2 @ exp.Yc).view(C, B, H, W).permute(1, 0, 2, 3)
            return _batch_norm_centred(uc, W2 @ exp.b, bn2, st2)
        K, k = algebra.contraction_map(W2, exp)
        # the contraction's P-sized product and its backward in the plan's precisions
        prec, gprec = plan.of(policy, "contraction"), plan.of(policy, "contraction_grad")
        if st2 is not None and st2.batch_stats:
            # uc = K (X - mean): the contraction's output centred at its batch mean W2 b
            # (docs/design.md section 3), from the centred positions, so nothing cancels
            # and a constant batch gives exactly zero, as in the literal BatchNorm.
            # (A BatchNorm'd expansion in eval mode before a training one, exp.shift None:
            # the output is centred at its own mean, accumulated in float64.)
            if exp.shift is not None:
                uc = products.conv1x1(f_in, K.to(f_in.dtype), prec,
                                      (-(K @ exp.shift)).to(f_in.dtype), gprec)
                centre = W2 @ exp.b
            else:
                u = products.conv1x1(f_in, K.to(f_in.dtype), prec, k.to(f_in.dtype), gprec)
                mean_u = u.mean(dim=(0, 2, 3), dtype=torch.float64).to(u.dtype)
                uc, centre = u - mean_u[:, None, None], mean_u.to(K.dtype)
            uc = uc if uc.dtype == K.dtype else uc.to(K.dtype)
            count = uc.shape[0] * uc.shape[2] * uc.shape[3]
            if sync is None:
                return _batch_norm_centred(uc, centre, bn2, st2)
            # Synchronised statistics: uc's mean (a rounding residual: no cancellation in
            # the mean square minus its square, clamped >= 0) and variance, combined
            mean_uc = uc.mean(dim=(0, 2, 3))
            var2 = (uc.square().mean(dim=(0, 2, 3)) - mean_uc.square()).clamp_min(0)
            mean_uc, var2, count = distributed.global_moments(mean_uc, var2, count, sync[0])
            gamma2, beta2 = algebra.affine_params(bn2, K.dtype)
            a2 = gamma2 * torch.rsqrt(var2 + bn2.eps)
            if st2.update:
                algebra.update_running(bn2, st2, centre + mean_uc, var2, count)
            return torch.addcmul((beta2 - a2 * mean_uc)[:, None, None], uc, a2[:, None, None])
        u = products.conv1x1(f_in, K.to(f_in.dtype), prec, None, gprec)
        if bn2 is not None:
            # the eval BatchNorm's a2 u + (a2 k + c2) applied to the map, not folded into K:
            # its parameters' gradients are then sums over the positions in float64, as
            # the literal's BatchNorm has them, not products over a folded map
            a2, c2 = algebra.eval_affine(bn2, K.shape[0], K.dtype, K.device)
            return _ChannelAffine.apply(u, a2.to(u.dtype), (a2 * k + c2).to(u.dtype))
        return _ChannelAffine.apply(u, None, k.to(f_in.dtype))

    # --- use as a forward hook on a model's stage (norm_fast.attach) ----------------------
    def set_teacher(self, f_t: Optional[Tensor]) -> None:
        """Teacher features (B, C_t, H, W) for the next hooked forward only."""
        self._teacher = f_t

    def hook(self, stage: nn.Module, inputs, output: Tensor) -> Tensor:
        """Forward hook: replace the stage's output by the FT features.

        Consumes the teacher given to `set_teacher` (never reused by a later forward) and
        stores the loss in `last_loss` (None when no teacher was set).
        """
        f_t, self._teacher = getattr(self, "_teacher", None), None
        features, self.last_loss = self(output, f_t)
        return features

    def remove(self) -> None:
        """Remove the forward hook installed by `norm_fast.attach` (the FT stays a submodule)."""
        handle = getattr(self, "_hook_handle", None)
        if handle is not None:
            handle.remove()
            self._hook_handle = None

    # -------------------------------------------------------------------------------------
    def load_reference_state_dict(self, state_dict, expand_key: str = "layer31",
                                  contract_key: str = "layer32", strict: bool = True):
        """Load the FT from a student checkpoint of the reference training code.

        The reference names the FT `<expand_key>.0.weight`, `<expand_key>.1.{weight, bias,
        running_mean, running_var, num_batches_tracked}` and the same under
        `<contract_key>` (docs/design.md section 1); a common prefix such as "module." is allowed and
        every other key is ignored. Returns what `load_state_dict` returns.
        """
        prefixes = {k[: -len(f"{expand_key}.0.weight")] for k in state_dict
                    if k.endswith(f"{expand_key}.0.weight")}
        if len(prefixes) != 1:
            raise ValueError(f"expected exactly one key ending in '{expand_key}.0.weight' in "
                             f"the checkpoint, found {len(prefixes)} (keys: "
                             f"{sorted(state_dict)[:8]}...)")
        prefix = prefixes.pop()
        mapping = {f"{prefix}{expand_key}.0.": "expand.", f"{prefix}{expand_key}.1.": "expand_bn.",
                   f"{prefix}{contract_key}.0.": "contract.",
                   f"{prefix}{contract_key}.1.": "contract_bn."}
        ours = {}
        for key, value in state_dict.items():
            for src, dst in mapping.items():
                if key.startswith(src):
                    ours[dst + key[len(src):]] = value
        return self.load_state_dict(ours, strict=strict)

    def merge_into(self, fc: nn.Linear) -> nn.Linear:
        """A new classifier equal, in eval mode, to `fc` applied after the FT (docs/design.md section 2)."""
        from .fold import merge_into   # fold imports this module's class for checks
        return merge_into(self, fc)


def _residual_source(f_s: Tensor, origin: Optional[Tensor], cov: Tensor) -> Optional[Tensor]:
    """f_s (B, C, L) when the decomposed loss's residual should multiply f_s itself rather
    than the stored centred map, else None (docs/design.md section 4).

    The stored x - origin carries a rounding of half an ulp of each entry, shared by
    every row of the residual; f_s itself has none, but its products are as large as
    |f_s| where the centred ones are as large as its spread. Measured on the residual's
    error near convergence: f_s wins while the mean's energy is below the variance's
    (post-ReLU maps: mean^2 0.16 against 0.34), the centred map beyond (relu + 0.5:
    0.81 against 0.34). Decided on CPU tensors only, where reading the moments costs no
    device synchronisation; outside torch.compile; CUDA tensors and range-scaled maps
    (sigma > 1: a single huge entry would dominate the products) read the centred map."""
    if (origin is None or f_s.device.type != "cpu" or torch.compiler.is_compiling()
            or f_s.dtype not in (torch.float32, torch.float64)):
        return None
    if bool(origin.double().square().sum() < cov.diagonal().double().sum()):
        return f_s.detach().flatten(2)
    return None


class _ChannelAffine(torch.autograd.Function):
    """a * u + b per channel of u (B, C, H, W) (a None: u + b), the gradients of a and b
    summed over the positions in float64: what the literal's eval-mode BatchNorm returns
    for its parameters (with a double accumulator on CPU); a float32 sum errs by several
    ulps of it."""

    @staticmethod
    def forward(ctx, u, a, b):
        ctx.save_for_backward(u if a is not None else None, a)
        if a is None:
            return u + b[:, None, None]
        return torch.addcmul(b[:, None, None], u, a[:, None, None])

    @staticmethod
    def backward(ctx, g):
        u, a = ctx.saved_tensors
        gu = g if a is None else g * a[:, None, None]
        ga = None
        if a is not None and ctx.needs_input_grad[1]:
            ga = (g * u).sum(dim=(0, 2, 3), dtype=torch.float64).to(a.dtype)
        gb = g.sum(dim=(0, 2, 3), dtype=torch.float64).to(g.dtype)
        return gu, ga, gb


def _batch_norm_centred(uc: Tensor, centre: Tensor, bn2: nn.Module, st2: algebra.BNState
                        ) -> Tensor:
    """Training BatchNorm of contract(Y) = uc + centre, given uc (B, C_s, H, W) centred
    near its batch mean: the literal's own batch_norm kernel normalises uc (statistics
    from the data, never negative; one fused backward; the result does not depend on the
    centre) and returns the batch mean and 1/sqrt(var + eps) it used, from which the
    running statistics of uc + centre are updated as nn.BatchNorm2d would: one pass
    over uc, no running buffer handed to the op (it would save them for its backward,
    and the next forward's update would invalidate that)."""
    out, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(
        uc, bn2.weight, bn2.bias, True, 0.0, bn2.eps)
    if st2.update:
        with torch.no_grad():
            var = (invstd.pow(-2) - bn2.eps).clamp_min(0)
            algebra.update_running(bn2, st2, centre + mean, var,
                                   uc.shape[0] * uc.shape[2] * uc.shape[3])
    return out
