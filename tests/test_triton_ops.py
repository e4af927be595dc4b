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


def _check_several_tiles(dtype):
    """Forward and every gradient against torch at a shape of several position, channel
    and K tiles and several backward chunks (GPU block sizes)."""
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expand_mse_gpu_tiling_on_interpreter(dtype, monkeypatch):
    """The GPU block sizes (several position, channel and K tiles) run on the interpreter."""
    blocks = expand_mse._blocks
    monkeypatch.setattr(expand_mse, "_blocks",
                        lambda P, C_s, C_t, dt, interpreted, kind="fwd":
                        blocks(P, C_s, C_t, dt, False, kind))
    _check_several_tiles(dtype)


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


def _compile_for_sm90(kernel, pointer_types, constexprs, num_warps, num_stages=2):
    """Compile `kernel` for sm_90 ahead of time (no GPU needed: frontend, LLVM, ptxas),
    with the register ceiling its GPU launches use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in constexprs else pointer_types.get(name, "i32"))
                 for name in kernel.arg_names}
    # What the JIT specialises at run time for the usual shapes: 16-byte aligned tensors,
    # sizes and strides divisible by 16 (C_s, C_t, B*L, chunk starts; not n, not unit
    # strides). Masks and address runs are analysed with these (vector widths).
    div16 = {"P", "Pc", "p0", "C_s", "C_t", "C", "span", "P_BUCKET", "sxb", "sxc", "stb",
             "stc"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name not in constexprs and (signature[name].startswith("*") or name in div16)}
    src = ASTSource(kernel, signature, constexprs=dict(constexprs), attrs=attrs)
    # the register ceiling of the expand_mse launches (`launch.MAXNREG`); the other
    # kernels are launched without one
    maxnreg = (_triton_launch.MAXNREG if kernel in (expand_mse._expand_mse_fwd_kernel,
                                                    expand_mse._expand_mse_bwd_err_kernel)
               else None)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages,
                                       maxnreg=maxnreg))


def ptxas_usage(compiled):
    """(registers, spill bytes) of a compiled kernel, from ptxas -v on its PTX (sm_90a).

    A kernel compiled ahead of time is never loaded, so its n_regs / n_spills stay
    unset; Triton's own ptxas reports the same numbers (spill bytes = stores + loads).
    """
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the one Triton itself uses for sm_90 (version-specific)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "-arch=sm_90a", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


_TL = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
       torch.float16: "fp16"}


def gpu_kernel_builds(dtype, precision="ieee", L=49):
    """Every (name, kernel, pointer types, constexprs, warps, stages) the GPU may launch
    for inputs of `dtype`: both expand kernels at every configuration of
    expand_mse.GPU_CONFIGS (unclamped: the largest tiles), resident x and not, and
    the moments kernel at its GPU blocks."""
    from norm_fast.ops.spec import compute_dtype
    cdt = compute_dtype(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    acc = "*" + _TL[cdt]
    io = "*" + _TL[dtype]
    gemm = io if half else acc
    ptrs = {n: acc for n in ("b_ptr", "shift_ptr", "part_ptr", "err_ptr", "g2_ptr",
                             "s_ptr", "cov_ptr", "sum_ptr")}
    ptrs.update(x_ptr=io, t_ptr=io, dt_ptr=io, a_ptr=gemm, e_ptr=gemm, xc_ptr=gemm)
    rnd, dot, prec = _triton_launch.dot_dtypes(dtype, False, precision)
    common = dict(L=L, X_CONTIG=True, T_CONTIG=True, HAS_SHIFT=not half,  # as launched
                  ACC=_triton_launch.tl_dtype(cdt), RND=rnd, DOT=dot, PREC=prec)
    kernels = {
        "fwd": (expand_mse._expand_mse_fwd_kernel, dict(STORE_ERR=True)),
        "bwd": (expand_mse._expand_mse_bwd_err_kernel,
                dict(WRITE_E=True, WRITE_XC=True, WRITE_DT=True, E_BKL=False)),
    }
    for kind, (kernel, flags) in kernels.items():
        for bp, bc, bk, warps, stages in expand_mse.GPU_CONFIGS[kind][dtype]:
            blocks = dict(BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk)
            cfg = f"{bp}x{bc}x{bk} w{warps} s{stages}"
            for resident in (False, True):
                tag = " x-resident" if resident else ""
                yield (f"{kind} {cfg}{tag}", kernel, ptrs,
                       dict(common, X_RESIDENT=resident, **flags, **blocks), warps, stages)
    # the moments kernel accumulates in float64 whatever the input (moments.py)
    bi, bj, bpm, _, warps_m = moments_mod._blocks(10**6, 512, False)
    # (16-bit x is widened to float32 before this kernel: moments.moments)
    mptrs = dict(ptrs, x_ptr="*fp32" if half else io, s_ptr="*fp64", cov_ptr="*fp64",
                 sum_ptr="*fp64")
    yield (f"moments {bi}x{bj}x{bpm} w{warps_m} s2", moments_mod._moments_kernel, mptrs,
           dict(ACC=_triton_launch.tl_dtype(torch.float64), PREC="ieee", BLOCK_I=bi,
                BLOCK_J=bj, BLOCK_P=bpm), warps_m, 2)
    yield from fused_step_builds(dtype, precision, L)


def fused_step_builds(dtype, precision="ieee", L=49):
    """The kernels of the fused training step (norm_fast/train_step.py) as the GPU launches
    them: the direct loss's error recomputation in convolution-gradient layout (every
    backward configuration), the channel statistics, centring moments and finalize
    kernels, and the expansion's two small-algebra kernels (compute dtype: float32 for
    16-bit inputs, so those two are built for float32 and float64 inputs only)."""
    from norm_fast.ops.spec import compute_dtype
    from norm_fast.ops.triton import expansion as expansion_mod
    cdt = compute_dtype(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    acc, io, f64 = "*" + _TL[cdt], "*" + _TL[dtype], "*fp64"
    gemm = io if half else acc
    tl_cdt = _triton_launch.tl_dtype(cdt)
    ptrs = {n: acc for n in ("b_ptr", "shift_ptr", "g2_ptr", "xc_ptr", "dt_ptr")}
    ptrs.update(x_ptr=io, t_ptr=io, a_ptr=gemm, e_ptr=gemm)
    rnd, dot, prec = _triton_launch.dot_dtypes(dtype, False, precision)
    common = dict(L=L, X_CONTIG=True, T_CONTIG=True, HAS_SHIFT=not half, ACC=tl_cdt, RND=rnd,
                  DOT=dot, PREC=prec, WRITE_E=True, WRITE_XC=False, WRITE_DT=False,
                  E_BKL=True)
    for bp, bc, bk, warps, stages in expand_mse.GPU_CONFIGS["bwd"][dtype]:
        for resident in (False, True):
            yield (f"bwd-error {bp}x{bc}x{bk} w{warps} s{stages}"
                   + (" x-resident" if resident else ""),
                   expand_mse._expand_mse_bwd_err_kernel, ptrs,
                   dict(common, X_RESIDENT=resident, BLOCK_P=bp, BLOCK_C=bc, BLOCK_K=bk),
                   warps, stages)
    if precision not in ("ieee", "tf32x3"):
        return  # the rest is exact whatever the precision (the Gram: "ieee" or "tf32x3")
    yield ("channel-stats 16x128 w4 s2", moments_mod._channel_stats_kernel,
           dict(x_ptr=io, sum_ptr=f64, amax_ptr=acc),
           dict(AMAX=tl_cdt, BLOCK_C=16, BLOCK_P=128), 4, 2)
    bi, bj, bpm, _, warps_m = moments_mod._blocks(10**6, 512, False)
    bpm = 16 if dtype == torch.float64 else bpm     # as moments.centred_moments launches
    slab3 = dtype == torch.float32 and precision == "tf32x3"
    yield (f"moments-centred {bi}x{bj}x{bpm} w{warps_m} s2",
           moments_mod._centred_moments_kernel,
           dict(x_ptr=io, sum_ptr=f64, amax_ptr=acc, xc_ptr=io, cov_ptr=f64, rsum_ptr=f64),
           dict(XDT=_triton_launch.tl_dtype(dtype), CDT=tl_cdt,
                ACC=_triton_launch.tl_dtype(torch.float64),
                # the plan's Gram: float64 FMA ("ieee" here), 3xTF32 slabs ("tf32x3")
                PREC="tf32x3" if slab3 else ("tf32" if half else "ieee"),
                DOT16=half or slab3, BLOCK_I=bi, BLOCK_J=bj, BLOCK_P=bpm), warps_m, 2)
    bf = moments_mod._finalize_blocks(512, False)
    for centred in (False, True):
        yield (f"moments-finalize {bf}x{bf} w4 s2" + (" centred" if centred else ""),
               moments_mod._moments_finalize_kernel,
               dict(cov_part=f64, rsum_part=f64, shift_ptr=f64, sum_ptr=f64, amax_ptr=acc,
                    mean_ptr=acc, cov_ptr=acc, o_ptr=acc, scales_ptr=acc),
               dict(CENTRED=centred, CDT=tl_cdt, BLOCK_I=bf, BLOCK_J=bf), 4, 2)
    if half:
        return
    br, bc, warps_e = expansion_mod._blocks(512, 512, cdt, False)
    cfg = f"{br}x{bc} w{warps_e} s1"
    for decomposed in (False, True):
        tag = " decomposed" if decomposed else ""
        yield (f"expansion-fwd {cfg}{tag}", expansion_mod._expansion_fwd_kernel,
               {n: (f64 if n == "a64_ptr" else acc)
                for n in expansion_mod._expansion_fwd_kernel.arg_names if n.endswith("_ptr")},
               dict(DECOMP=decomposed, BLOCK_R=br, BLOCK_C=bc), warps_e, 1)
        for has2 in ((False,) if decomposed else (False, True)):
            yield (f"expansion-bwd {cfg}{tag}" + (" +gA" if has2 else ""),
                   expansion_mod._expansion_bwd_kernel,
                   {n: acc for n in expansion_mod._expansion_bwd_kernel.arg_names
                    if n.endswith("_ptr")},
                   dict(HAS_GA2=has2, DECOMP=decomposed, BLOCK_R=br, BLOCK_C=bc), warps_e, 1)
    yield ("expansion-centre 16x64 w4 s1", expansion_mod._centre_kernel,
           dict(w_ptr=acc, out_ptr=acc), dict(BLOCK_R=16, BLOCK_C=64), 4, 1)
    yield ("decomposed-total 1024 w4 s1", expansion_mod._total_kernel,
           {n: acc for n in expansion_mod._total_kernel.arg_names if n.endswith("_ptr")},
           dict(BLOCK=1024), 4, 1)


def _need_aot():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"no ahead-of-time compiler: {exc}")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_compile_for_hopper(dtype):
    """The compiled (non-interpreted) frontend accepts every kernel with the default GPU
    blocks, and the 16-bit products run on Hopper's tensor cores (wgmma).

    The interpreter is more permissive than code generation; this catches kernels that
    only the interpreter accepts, on machines without a GPU.
    """
    _need_aot()
    defaults = {"{} {}x{}x{} w{} s{}".format(kind, *cfgs[dtype][0])
                for kind, cfgs in expand_mse.GPU_CONFIGS.items()}
    for name, kernel, ptrs, consts, warps, stages in gpu_kernel_builds(dtype):
        if name not in defaults and not name.startswith("moments"):
            continue
        k = _compile_for_sm90(kernel, ptrs, consts, warps, stages)
        if dtype == torch.bfloat16 and not name.startswith("moments"):
            assert "wgmma" in k.asm["ptx"], name  # tensor cores on Hopper


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.bfloat16, "ieee"),
                                             (torch.float64, "ieee")])
def test_gpu_configs_compile_without_spills(dtype, precision):
    """Every GPU configuration (expand kernels at every autotune configuration, x
    resident or not; the moments kernel) compiles for sm_90 with no register spills."""
    _need_aot()
    spilled = []
    for name, kernel, ptrs, consts, warps, stages in gpu_kernel_builds(dtype, precision):
        k = _compile_for_sm90(kernel, ptrs, consts, warps, stages)
        regs, spills = ptxas_usage(k)
        if spills:
            spilled.append((name, regs, spills))
        if precision == "tf32" and name.split()[0] in ("fwd", "bwd", "bwd-error"):
            assert "mma" in k.asm["ptx"], name  # TF32 tensor cores, not FMA
    assert not spilled, f"register spills (name, registers, bytes): {spilled}"


def test_tf32_precision_reaches_the_dot():
    assert _triton_launch.dot_dtypes(torch.float32, False, "tf32")[2] == "tf32"
    assert _triton_launch.dot_dtypes(torch.float32, False, "tf32x3")[2] == "tf32x3"
    assert _triton_launch.dot_dtypes(torch.float32, True, "tf32")[2] == "ieee"  # interpreter
    assert _triton_launch.dot_dtypes(torch.float64, False, "tf32")[2] == "ieee"
    x, t, a, b, s = _problem(1, 5, 5, 15, 1, False, "contiguous", torch.float32, "cpu")
    for bad in ("fp32", "TF32", None):
        with pytest.raises(ValueError, match="precision"):
            triton_backend.expand_mse_forward(x, t, a, b, s, 1, False, precision=bad)
        with pytest.raises(ValueError, match="precision"):
            triton_backend.expand_mse_backward(torch.tensor(1.0), x, t, a, b, s, 1, None,
                                               [True] * 5, precision=bad)
    # Accepted everywhere; the interpreter multiplies exactly whatever the flag says.
    want = torch_ops.expand_mse_forward(x, t, a, b, s, 1, False)[0]
    for prec in ("ieee", "tf32", "tf32x3"):
        _close(triton_backend.expand_mse_forward(x, t, a, b, s, 1, False, precision=prec)[0],
               want, RTOL[torch.float32], prec)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stored", [False, True], ids=["recompute", "stored-error"])
def test_backward_16bit_gemm_operands(dtype, stored, device, monkeypatch):
    """16-bit inputs: the backward's GEMM operands (error, centred student, folded map)
    are held in the input dtype, and the gradients stay within bf16/fp16 rounding of a
    float64 truth computed from the same (rounded) inputs.

    Tolerance: u = 2**-8 (bf16) or 2**-11 (fp16), the unit roundoff. Each gradient is a
    sum of products of two operands, each rounded once to the input dtype (relative u/2
    each) with float32 accumulation (negligible), so its error is at most about u times
    the sum of |products|; relative to the largest gradient entry that is a few u here
    (the products do not cancel much at these sizes). 4u is asserted.
    """
    n = 1 if stored else 2
    B, C_s, C_t, L = 3, 40, 19, 15
    x, t, a, b, s = _problem(B, C_s, C_t, L, n, True, "channels_last", dtype, device)
    x64, t64, a64, b64, s64 = (v.double() for v in (x, t, a, b, s))
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    seen = []
    launch = _triton_launch.launch

    def spy(kernel, grid, args, constexprs, device, **kw):
        if kernel is expand_mse._expand_mse_bwd_err_kernel:
            seen.append((args[6].dtype, args[7].dtype, args[2].dtype))  # e, xc, a
        return launch(kernel, grid, args, constexprs, device, **kw)

    monkeypatch.setattr(_triton_launch, "launch", spy)
    err = None
    if stored:
        _, err = triton_backend.expand_mse_forward(x, t, a, b, s, n, True)
    grad = torch.tensor(0.37, dtype=torch.float32, device=device)
    got = triton_backend.expand_mse_backward(grad, x, t, a, b, s, n, err, [True] * 5,
                                             chunk_bytes=64 * n * C_t * 2)
    want = torch_ops.expand_mse_backward(grad.double(), x64, t64, a64, b64, s64, n, None,
                                         [True] * 5)
    if not stored:
        assert seen and all(d == (dtype, dtype, dtype) for d in seen), seen
    for name, g, w in zip(("dx", "dt", "da", "db", "dshift"), got, want):
        _close(g.double(), w, 4 * u, f"{dtype} {name}")


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contiguous_positions_load_as_vectors(dtype):
    """With L a compile-time constant and unit stride along l (X_CONTIG / T_CONTIG), the
    x and t tiles load 16 bytes a thread when L has a power-of-two factor (32x32 maps);
    with a run-time stride along l they load element by element."""
    _need_aot()
    name, kernel, ptrs, consts, warps, stages = next(gpu_kernel_builds(dtype, L=1024))
    assert name.startswith("fwd") and "resident" not in name
    vec = _compile_for_sm90(kernel, ptrs, consts, warps, stages).asm["ptx"]
    scalar = _compile_for_sm90(kernel, ptrs, dict(consts, X_CONTIG=False, T_CONTIG=False),
                               warps, stages).asm["ptx"]
    # (the bias and shift vectors load as v4 in both)
    assert vec.count("ld.global.v4") > scalar.count("ld.global.v4")


def test_autotune_set_and_pruning(monkeypatch):
    """The autotuner (CUDA only) tries exactly the kernel's list for the input dtype,
    clamped to the problem; NORM_FAST_TRITON_AUTOTUNE=0 turns it off."""
    import triton
    tuned = expand_mse._tuned(expand_mse._expand_mse_fwd_kernel)
    assert isinstance(tuned, triton.runtime.autotuner.Autotuner)
    assert tuned.keys[:5] == ["P_BUCKET", "C_s", "C_t", "n", "L"] and "PREC" in tuned.keys
    assert "STORE_ERR" in tuned.keys
    assert "WRITE_XC" in expand_mse._tuned(expand_mse._expand_mse_bwd_err_kernel).keys
    configs = expand_mse._all_configs()
    for kind, table in expand_mse.GPU_CONFIGS.items():
        for dtype, cfgs in table.items():
            P, C_s, C_t = (10**5, 512, 512) if dtype != torch.float16 else (1000, 40, 19)
            args = dict(x_ptr=torch.empty(0, dtype=dtype), C_s=C_s, C_t=C_t,
                        **({"P": P} if kind == "fwd" else {"Pc": P}))
            kept = expand_mse._prune(configs, args)
            assert sorted(map(expand_mse._config_tuple, kept)) == sorted(
                {expand_mse._clamp(P, C_s, C_t, c) for c in cfgs}), (kind, dtype)
    monkeypatch.setenv("NORM_FAST_TRITON_AUTOTUNE", "0")
    assert not expand_mse.autotune_enabled()
    monkeypatch.setenv("NORM_FAST_TRITON_AUTOTUNE", "1")
    assert expand_mse.autotune_enabled()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autotuned_launch_glue_on_interpreter(dtype, monkeypatch):
    """The autotuned GPU path's host code, run on the interpreter: a stand-in for the
    autotuner picks the *last* configuration its pruning keeps (not the default),
    records it as `best_config` as Triton's does, and launches the kernel with it and
    the residency heuristic. The grid, the partial-sum buffer and the backward chunks
    must follow whichever configuration ran."""
    from triton.runtime.autotuner import Autotuner
    launch = _triton_launch.launch
    used = []

    def fake_launch(kernel, grid, args, constexprs, device, num_warps=4, **kw):
        if not isinstance(kernel, Autotuner):
            return launch(kernel, grid, args, constexprs, device, num_warps=num_warps, **kw)
        assert num_warps is None and callable(grid)
        nargs = dict(zip(kernel.arg_names, args))
        cfg = kernel.early_config_prune(kernel.configs, nargs)[-1]
        kernel.best_config = cfg
        meta = dict(constexprs, **cfg.kwargs)
        meta.update({k: h({**nargs, **meta}) for k, h in kernel.fn.values.items()})
        used.append((kernel.fn.fn.fn.__name__, cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"]))
        return launch(kernel.fn.fn, grid(meta), args, meta, device)

    monkeypatch.setattr(_triton_launch, "launch", fake_launch)
    monkeypatch.setattr(_triton_launch, "uses_interpreter", lambda t: False)
    monkeypatch.setenv("NORM_FAST_TRITON_AUTOTUNE", "1")
    _check_several_tiles(dtype)
    kinds = {u[0] for u in used}
    assert kinds == {"_expand_mse_fwd_kernel", "_expand_mse_bwd_err_kernel"}, used
    assert any(u[1:] != expand_mse.GPU_CONFIGS["fwd"][dtype][0][:2] for u in used), used


def test_gemm_precision_context_sets_and_restores():
    from norm_fast.ops.spec import gemm_precision
    """The backward's float32 cuBLAS GEMMs follow `precision` on CUDA (the flag is only
    set and restored here: no GPU is needed to check that), and nothing else."""
    flags = torch.backends.cuda.matmul
    before = flags.fp32_precision
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for prec, want in (("tf32", "tf32"), ("ieee", "ieee"), ("tf32x3", "ieee")):
        with gemm_precision(cuda, torch.float32, prec):
            assert flags.fp32_precision == want
        assert flags.fp32_precision == before
    for device, dtype in ((cpu, torch.float32), (cuda, torch.bfloat16), (cuda, torch.float64)):
        with gemm_precision(device, dtype, "tf32"):
            assert flags.fp32_precision == before
