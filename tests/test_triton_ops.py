"""The Triton kernel set against the pure-PyTorch contract (norm_fast/ops/torch_ops.py).

CPU tensors run the kernels under Triton's interpreter, so shapes are small; CUDA is
added to the device list when available. Shapes are chosen to catch tiling bugs:
channel counts that are not powers of two, below and above one block; L in {1, 15, 49};
non-contiguous x and t (channels_last flatten, transposed views, strided slices).
"""
from __future__ import annotations

import pytest
import torch

from norm_fast.ops import eager as torch_ops
from norm_fast.ops.triton import KERNELS as triton_backend

if not triton_backend.available()[0]:
    pytest.skip(triton_backend.available()[1], allow_module_level=True)

from norm_fast.ops.triton import expand_mse, moments as moments_mod  # noqa: E402
from norm_fast.ops.triton import launch as _triton_launch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HW = {1: (1, 1), 15: (3, 5), 49: (7, 7)}
MASKS = [
    [True, True, True, True, True],
    [False, True, False, True, False],
    [True, False, True, False, True],
]


def _features(B, C, L, layout, dtype, device, gen, offset=0.0):
    """(B, C, L) random features with the given memory layout."""
    if layout == "channels_last":  # a NHWC feature map viewed as (B, C, H*W)
        H, W = HW[L]
        f = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) + offset
        f = f.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        v = f.flatten(2)
        assert v.shape == (B, C, L) and v.data_ptr() == f.data_ptr()  # a view
    elif layout == "transposed":  # (B, L, C) storage
        v = (torch.randn(B, L, C, generator=gen, dtype=torch.float64) + offset)
        v = v.to(device=device, dtype=dtype).transpose(1, 2)
    elif layout == "strided":  # every other channel of a wider map
        v = (torch.randn(B, 2 * C, L, generator=gen, dtype=torch.float64) + offset)
        v = v.to(device=device, dtype=dtype)[:, ::2]
    else:
        v = (torch.randn(B, C, L, generator=gen, dtype=torch.float64) + offset)
        v = v.to(device=device, dtype=dtype)
    return v


def _problem(B, C_s, C_t, L, n, with_shift, layout, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _features(B, C_s, L, layout, dtype, device, gen)
    t = _features(B, C_t, L, "transposed" if layout == "channels_last" else layout,
                  dtype, device, gen)
    cdt = torch_ops.compute_dtype(dtype)
    a = (torch.randn(n * C_t, C_s, generator=gen, dtype=torch.float64) / C_s ** 0.5)
    b = torch.randn(n * C_t, generator=gen, dtype=torch.float64)
    s = torch.randn(C_s, generator=gen, dtype=torch.float64) if with_shift else None
    to = dict(device=device, dtype=cdt)
    return x, t, a.to(**to), b.to(**to), (s.to(**to) if s is not None else None)


def _close(got, want, rtol, what):
    """Relative to the largest magnitude of `want` (errors of sums scale with it)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    if want.numel() == 0:
        return
    scale = want.abs().max().clamp_min(1e-30)
    err = ((got - want).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.1g}"


RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}

# (B, C_s, C_t, L, n, shift, store_error, layout)
CASES = [
    (3, 19, 5, 15, 3, True, False, "channels_last"),
    (1, 40, 19, 49, 1, False, True, "contiguous"),
    (3, 5, 40, 1, 2, True, False, "transposed"),
    (1, 19, 40, 49, 1, True, True, "channels_last"),
    (3, 40, 19, 15, 2, False, False, "strided"),
    (3, 5, 19, 49, 3, True, False, "contiguous"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Cs{}-Ct{}-L{}-n{}-s{}-e{}-{}".format(*c))
def test_expand_mse_matches_torch(case, dtype, device):
    B, C_s, C_t, L, n, with_shift, store_error, layout = case
    x, t, a, b, s = _problem(B, C_s, C_t, L, n, with_shift, layout, dtype, device)
    rtol = RTOL[dtype]

    sq, err = triton_backend.expand_mse_forward(x, t, a, b, s, n, store_error)
    sq0, err0 = torch_ops.expand_mse_forward(x, t, a, b, s, n, store_error)
    _close(sq, sq0, rtol, "loss")
    _close(err, err0, rtol, "stored error")

    grad = torch.tensor(0.37, dtype=sq0.dtype, device=device)
    itemsize = torch.finfo(sq0.dtype).bits // 8
    tiny = 40 * n * C_t * itemsize  # 40 positions per chunk: several, crossing batch rows
    for mask in MASKS:
        want = torch_ops.expand_mse_backward(grad, x, t, a, b, s, n, None, mask)
        for chunk in (torch_ops.DEFAULT_CHUNK_BYTES, tiny):
            got = triton_backend.expand_mse_backward(grad, x, t, a, b, s, n, None, mask,
                                                     chunk_bytes=chunk)
            for name, g, w in zip(("dx", "dt", "da", "db", "dshift"), got, want):
                _close(g, w, rtol, f"{name} mask={mask} chunk={chunk}")
        if store_error:  # backward from the stored residual: no recomputation
            got = triton_backend.expand_mse_backward(grad, x, t, a, b, s, n, err, mask)
            for name, g, w in zip(("dx", "dt", "da", "db", "dshift"), got, want):
                _close(g, w, rtol, f"{name} (stored error) mask={mask}")


def test_store_error_needs_one_segment():
    x, t, a, b, s = _problem(1, 5, 5, 15, 2, False, "contiguous", torch.float64, "cpu")
    with pytest.raises(ValueError):
        triton_backend.expand_mse_forward(x, t, a, b, s, 2, True)


def test_backward_chunks_bound_the_error_buffer(monkeypatch):
    """Tiny chunk_bytes: several launches, none with more error than the bound."""
    B, C_s, C_t, L, n = 3, 19, 5, 15, 3
    x, t, a, b, s = _problem(B, C_s, C_t, L, n, True, "channels_last", torch.float64, "cpu")
    chunk = 11 * n * C_t * 8
    seen = []
    launch = _triton_launch.launch

    def spy(kernel, grid, args, constexprs, device, **kw):
        if kernel is expand_mse._expand_mse_bwd_err_kernel:
            seen.append(args[6].numel())  # the error chunk
        return launch(kernel, grid, args, constexprs, device, **kw)

    monkeypatch.setattr(_triton_launch, "launch", spy)
    grad = torch.tensor(1.0, dtype=torch.float64)
    got = triton_backend.expand_mse_backward(grad, x, t, a, b, s, n, None, [True] * 5,
                                             chunk_bytes=chunk)
    want = torch_ops.expand_mse_backward(grad, x, t, a, b, s, n, None, [True] * 5)
    assert len(seen) == -(-B * L // 11) > 1
    assert max(seen) * 8 <= chunk
    for g, w in zip(got, want):
        _close(g, w, 1e-10, "chunked")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expand_mse_gpu_tiling_on_interpreter(dtype, monkeypatch):
    """The GPU block sizes (several position, channel and K tiles) run on the interpreter."""
    blocks = expand_mse._blocks
    monkeypatch.setattr(expand_mse, "_blocks",
                        lambda P, C_s, C_t, dt, interpreted: blocks(P, C_s, C_t, dt, False))
    B, C_s, C_t, L, n = 3, 40, 70, 49, 2
    x, t, a, b, s = _problem(B, C_s, C_t, L, n, True, "channels_last", dtype, "cpu")
    rtol = RTOL[dtype]
    _close(triton_backend.expand_mse_forward(x, t, a, b, s, n, False)[0],
           torch_ops.expand_mse_forward(x, t, a, b, s, n, False)[0], rtol, "loss")
    grad = torch.tensor(0.5, dtype=torch_ops.compute_dtype(dtype))
    got = triton_backend.expand_mse_backward(grad, x, t, a, b, s, n, None, [True] * 5,
                                             chunk_bytes=100 * n * C_t * 8)
    want = torch_ops.expand_mse_backward(grad, x, t, a, b, s, n, None, [True] * 5)
    for name, g, w in zip(("dx", "dt", "da", "db", "dshift"), got, want):
        _close(g, w, rtol, name)


@pytest.mark.parametrize("device", DEVICES)
def test_expand_mse_bfloat16_against_float64_truth(device):
    """bfloat16 inputs: operands rounded to bfloat16, float32 accumulation."""
    B, C_s, C_t, L, n = 3, 40, 19, 15, 2
    x, t, a, b, s = _problem(B, C_s, C_t, L, n, True, "channels_last", torch.bfloat16,
                             device)
    x64, t64 = x.double(), t.double()
    a64, b64, s64 = a.double(), b.double(), s.double()
    sq, err = triton_backend.expand_mse_forward(x, t, a, b, s, n, False)
    sq64, _ = torch_ops.expand_mse_forward(x64, t64, a64, b64, s64, n, False)
    assert sq.dtype == torch.float32
    _close(sq.double(), sq64, 2e-2, "bf16 loss")
    grad = torch.tensor(0.37, dtype=torch.float32, device=device)
    got = triton_backend.expand_mse_backward(grad, x, t, a, b, s, n, None, [True] * 5,
                                             chunk_bytes=64 * n * C_t * 4)
    want = torch_ops.expand_mse_backward(grad.double(), x64, t64, a64, b64, s64, n, None,
                                         [True] * 5)
    dtypes = (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.float32)
    for name, g, w, dt in zip(("dx", "dt", "da", "db", "dshift"), got, want, dtypes):
        assert g.dtype == dt, (name, g.dtype)
        _close(g.double(), w, 3e-2, f"bf16 {name}")


# (B, C, L, layout)
MOMENT_CASES = [
    (3, 19, 15, "channels_last"),
    (1, 40, 49, "transposed"),
    (3, 5, 1, "contiguous"),
    (3, 40, 49, "strided"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", MOMENT_CASES, ids=lambda c: "B{}-C{}-L{}-{}".format(*c))
def test_moments_matches_torch(case, dtype, device):
    B, C, L, layout = case
    gen = torch.Generator().manual_seed(1)
    x = _features(B, C, L, layout, dtype, device, gen, offset=0.5)
    mean, cov = triton_backend.moments(x)
    mean0, cov0 = torch_ops.moments(x)
    _close(mean, mean0, RTOL[dtype], "mean")
    _close(cov, cov0, RTOL[dtype], "cov")
    assert torch.equal(cov, cov.transpose(0, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_moments_large_mean(dtype, device):
    """Mean 100x the spread (post-ReLU-like): the shifted pass must not cancel.

    In float32 the Gram form G/P - xbar xbar^T loses about 1e4 * eps = 6e-4 of the
    covariance here; the shifted pass stays near eps.
    """
    gen = torch.Generator().manual_seed(2)
    x = _features(3, 19, 49, "channels_last", dtype, device, gen, offset=100.0)
    mean, cov = triton_backend.moments(x)
    mean64, cov64 = torch_ops.moments(x.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _close(mean.double(), mean64, tol, "mean")
    _close(cov.double(), cov64, tol, "cov")
    assert torch.equal(cov, cov.transpose(0, 1))
    if dtype == torch.float64:
        _close(cov, torch_ops.moments(x)[1], 1e-10, "cov vs torch_ops")


def test_moments_gpu_splits_on_interpreter(monkeypatch):
    """GPU blocks with several position splits and channel tiles run on the interpreter."""
    blocks = moments_mod._blocks
    monkeypatch.setattr(moments_mod, "_blocks", lambda P, C, interpreted: blocks(P, C, False))
    assert blocks(3 * 400, 70, False)[3] > 1
    gen = torch.Generator().manual_seed(3)
    x = _features(3, 70, 400, "transposed", torch.float64, "cpu", gen, offset=10.0)
    mean, cov = triton_backend.moments(x)
    mean0, cov0 = torch_ops.moments(x)
    _close(mean, mean0, 1e-10, "mean")
    _close(cov, cov0, 1e-10, "cov")


@pytest.mark.parametrize("device", DEVICES)
def test_moments_backward_is_torch(device):
    assert triton_backend.moments_backward is torch_ops.moments_backward


def test_backend_surface_and_interpreter_cleanup():
    ok, why = triton_backend.available()
    assert ok and why.startswith("triton ")
    for name in ("moments", "moments_backward", "expand_mse_forward", "expand_mse_backward"):
        assert callable(getattr(triton_backend, name))
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    before = JITFunction.__call__
    lang_before = (tl.arange, tl.load, tl.core.arange, tl.tensor.__add__)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    triton_backend.moments(x)  # calls tl.sum: a nested JITFunction
    x, t, a, b, s = _problem(1, 5, 5, 15, 2, True, "contiguous", torch.float64, "cpu")
    triton_backend.expand_mse_forward(x, t, a, b, s, 2, False)  # our own nested helpers
    assert JITFunction.__call__ is before  # the interpreter shim is scoped to a launch
    # ... and so is the interpreter's patch of triton.language, nested calls included
    # (left in place, it breaks every later compilation in the process).
    assert (tl.arange, tl.load, tl.core.arange, tl.tensor.__add__) == lang_before


def _compile_for_sm90(kernel, pointer_types, constexprs, num_warps):
    """Compile `kernel` for sm_90 ahead of time (no GPU needed: frontend, LLVM, ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in constexprs else pointer_types.get(name, "i32"))
                 for name in kernel.arg_names}
    src = ASTSource(kernel, signature, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=2))


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_compile_for_hopper(dtype):
    """The compiled (non-interpreted) frontend accepts every kernel with the GPU blocks.

    The interpreter is more permissive than code generation; this catches kernels that
    only the interpreter accepts, on machines without a GPU.
    """
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"no ahead-of-time compiler: {exc}")
    x_ty = "*fp32" if dtype == torch.float32 else "*bf16"
    rnd, dot, prec = _triton_launch.dot_dtypes(dtype, False)
    bp, bc, bk, warps = expand_mse._blocks(10**6, 512, 512, dtype, False)
    common = dict(HAS_SHIFT=True, ACC=_triton_launch.tl_dtype(torch.float32), RND=rnd,
                  DOT=dot, PREC=prec, BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk)
    small = {n: "*fp32" for n in ("a_ptr", "b_ptr", "shift_ptr", "part_ptr", "err_ptr",
                                   "g2_ptr", "e_ptr", "xc_ptr", "s_ptr", "cov_ptr",
                                   "sum_ptr")}
    ptrs = dict(small, x_ptr=x_ty, t_ptr=x_ty, dt_ptr=x_ty)
    k = _compile_for_sm90(expand_mse._expand_mse_fwd_kernel, ptrs,
                          dict(common, STORE_ERR=True), warps)
    if dtype == torch.bfloat16:
        assert "wgmma" in k.asm["ptx"]  # tensor cores on Hopper
    _compile_for_sm90(expand_mse._expand_mse_bwd_err_kernel, ptrs,
                      dict(common, WRITE_E=True, WRITE_XC=True, WRITE_DT=True), warps)
    bi, bj, bpm, _, warps_m = moments_mod._blocks(10**6, 512, False)
    _compile_for_sm90(moments_mod._moments_kernel, ptrs,
                      dict(ACC=_triton_launch.tl_dtype(torch.float32), PREC="ieee",
                           BLOCK_I=bi, BLOCK_J=bj, BLOCK_P=bpm), warps_m)
