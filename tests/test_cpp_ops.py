"""The C++ ("cpp") and CUDA ("cuda") kernel sets against the contract, eager.

Every function of the extension backends is compared with norm_fast/ops/eager.py
on the same inputs: float64 to a relative 1e-10, float32 to 1e-5 (both norm-wise), on
shapes chosen to catch tiling and chunking bugs (channel counts that are not powers of
two, below and above the CPU's 64-channel transpose tile and 128-row covariance panel;
L = 1, 15, 49; B = 1, 3), shift None/given, the stored error, a chunk_bytes of two
thirds of a batch row's error, a device chunk target of a few positions for the paths
chunk_bytes does not bound (chunks then split batch rows), and non-contiguous x / t (a
channels_last map's flatten(2), and a layout with no unit stride at all); larger
shapes on 1 and 2 threads for the passes' task splits; fp16/bf16 inputs; the memory
bound of the direct path; errors; the no-compiler fallback.  The same tests run the
"cuda" backend on CUDA tensors where a GPU is present.
"""
from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from norm_fast.ops import eager as T
from norm_fast.ops import extension as _extension

cpp_backend, cuda_backend = _extension.CPP, _extension.CUDA

BACKENDS = {"cpp": (cpp_backend, "cpu"), "cuda": (cuda_backend, "cuda")}
CONTRACT = ("moments", "moments_backward", "expand_mse_forward", "expand_mse_backward")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _backend_or_skip(name):
    mod, device = BACKENDS[name]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend: no CUDA device on this machine")
    ok, why = mod.available()
    if not ok:
        if device == "cpu" and _extension._compiler() is None:
            pytest.skip(f"cpp backend: no C++ compiler ({why})")
        pytest.fail(f"{name} backend unavailable although it should build here: {why}")
    return mod, device


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    return _backend_or_skip(request.param)


@pytest.fixture(autouse=True)
def one_thread(request):
    """The grid's shapes are far below the CPU passes' parallel grain, so they run on
    one thread anyway; one thread also keeps BLAS from threading its tiny products,
    whose spin-waits make the file many times slower on a busy machine.  The task
    splits over threads are tested by test_parallel_splits, at larger shapes."""
    if "threads" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=["default", "small"])
def chunking(request, backend):
    """'small': the device's chunk target set to 3000 bytes, i.e. chunks of a few
    positions that start and end inside batch rows, so every pass meets partial rows
    and the accumulators add over many chunks."""
    _, device = backend
    if request.param == "default":
        yield request.param
        return
    ext = _extension.module()
    old = ext._set_chunk_target_bytes(device, 3000)
    try:
        yield request.param
    finally:
        ext._set_chunk_target_bytes(device, old)


def _positions(B, C, L, layout, dtype, device, gen, offset=0.0):
    """A (B, C, L) tensor of random non-zero values in the given memory layout."""
    H, W = {1: (1, 1), 15: (3, 5), 49: (7, 7)}[L]
    base = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) + offset
    if layout == "contiguous":
        v = base.flatten(2)
    elif layout == "channels_last":
        v = base.to(memory_format=torch.channels_last).flatten(2)
    else:  # "strided": no unit stride along channels or positions
        wide = torch.zeros(B, L, 2 * C, dtype=torch.float64)
        wide[:, :, ::2] = base.flatten(2).transpose(1, 2)
        v = wide[:, :, ::2].transpose(1, 2)
        assert v.stride(1) != 1 and v.stride(2) != 1
    return v.to(device=device, dtype=dtype)


def _rel(got, want):
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def _check(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    err = _rel(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def _cpu(v):
    return None if v is None else v.cpu()


def test_exposes_the_contract():
    for mod, _ in BACKENDS.values():
        for name in CONTRACT + ("available",):
            assert callable(getattr(mod, name)), name
        ok, why = mod.available()
        assert isinstance(ok, bool) and isinstance(why, str)


# --- moments -------------------------------------------------------------------------
MOMENT_SHAPES = [(1, 5, 1), (3, 19, 15), (1, 40, 49), (3, 130, 49), (3, 300, 15)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", MOMENT_SHAPES)
def test_moments(backend, chunking, shape, layout, dtype):
    mod, device = backend
    gen = torch.Generator().manual_seed(1)
    x = _positions(*shape, layout, dtype, device, gen, offset=0.5)
    mean, cov = mod.moments(x)
    want_mean, want_cov = T.moments(x.cpu())
    _check(mean, want_mean, TOL[dtype], "mean")
    _check(cov, want_cov, TOL[dtype], "cov")


def test_moments_large_mean_float32(backend):
    """Post-ReLU-like data, mean 100x the spread: the centred product must not cancel."""
    mod, device = backend
    gen = torch.Generator().manual_seed(2)
    x64 = torch.randn(3, 130, 49, generator=gen, dtype=torch.float64) * 0.01 + 1.0
    _, cov = mod.moments(x64.float().to(device))
    _, truth = T.moments(x64.float().double())
    assert _rel(cov, truth) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grads", ["both", "mean", "cov", "none"])
@pytest.mark.parametrize("shape", [(1, 5, 1), (3, 40, 15), (3, 130, 49)])
def test_moments_backward(backend, chunking, shape, grads, dtype):
    mod, device = backend
    gen = torch.Generator().manual_seed(3)
    B, C, L = shape
    x = _positions(B, C, L, "channels_last", dtype, device, gen, offset=0.5)
    mean, _ = T.moments(x.cpu())
    gm = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype)
    gc = torch.randn(C, C, generator=gen, dtype=torch.float64).to(dtype)
    gm = gm if grads in ("both", "mean") else None
    gc = gc if grads in ("both", "cov") else None
    got = mod.moments_backward(x, mean.to(device), None if gm is None else gm.to(device),
                               None if gc is None else gc.to(device))
    want = T.moments_backward(x.cpu(), mean, gm, gc)
    _check(got, want, TOL[dtype], "dx")


# --- expand_mse ---------------------------------------------------------------------
# (B, C_s, C_t, L, n): every channel count on both sides, every L, B and n.
EXPAND_SHAPES = [
    (1, 5, 19, 1, 1),
    (3, 19, 5, 15, 2),
    (3, 40, 130, 49, 1),
    (1, 130, 40, 15, 3),
    (3, 130, 19, 49, 2),
    (3, 5, 40, 49, 3),
    (1, 19, 130, 1, 2),
    (3, 40, 5, 1, 1),
]
MASKS = [
    [True] * 5,
    [True, False, False, False, False],
    [False, True, False, False, False],
    [False, False, True, True, False],
    [False, False, False, False, True],   # dshift alone: dx's sums without dx
    [False] * 5,
]


def _expand_inputs(shape, layout, dtype, device, seed):
    B, C_s, C_t, L, n = shape
    gen = torch.Generator().manual_seed(seed)
    x = _positions(B, C_s, L, layout, dtype, device, gen, offset=0.5)
    t = _positions(B, C_t, L, layout, dtype, device, gen)
    a = (torch.randn(n * C_t, C_s, generator=gen, dtype=torch.float64) / C_s ** 0.5)
    b = torch.randn(n * C_t, generator=gen, dtype=torch.float64)
    shift = x.double().mean(dim=(0, 2)).cpu() + 0.1 * torch.randn(C_s, generator=gen,
                                                                  dtype=torch.float64)
    cdt = T.compute_dtype(dtype)
    return x, t, a.to(cdt), b.to(cdt), shift.to(cdt)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", EXPAND_SHAPES)
def test_expand_mse(backend, chunking, shape, layout, dtype):
    mod, device = backend
    n = shape[-1]
    x, t, a, b, shift = _expand_inputs(shape, layout, dtype, device, seed=sum(shape))
    tol = TOL[dtype]
    itemsize = torch.finfo(T.compute_dtype(dtype)).bits // 8
    # chunk_bytes of two thirds of one batch row's error: chunks split batch rows
    part_row = 2 * n * shape[2] * shape[3] * itemsize // 3
    grad = torch.tensor(0.7, dtype=T.compute_dtype(dtype))
    for sh, store, chunk_bytes in itertools.product(
            (None, shift), (False, True) if n == 1 else (False,),
            (T.DEFAULT_CHUNK_BYTES, part_row)):
        what = f"shift={sh is not None} store={store} chunk_bytes={chunk_bytes}"
        dev_sh = None if sh is None else sh.to(device)
        sq, err = mod.expand_mse_forward(x, t, a.to(device), b.to(device), dev_sh, n, store,
                                         chunk_bytes)
        want_sq, want_err = T.expand_mse_forward(x.cpu(), t.cpu(), a, b, sh, n, store,
                                                 chunk_bytes)
        _check(sq, want_sq, tol, f"sq ({what})")
        _check(err, want_err, tol, f"err ({what})")
        # Partial masks select outputs, independently of chunks and the stored error:
        # all of them on one combination, the full mask on every one.
        one = sh is not None and not store and chunk_bytes == T.DEFAULT_CHUNK_BYTES
        for mask in MASKS if one else MASKS[:1]:
            got = mod.expand_mse_backward(grad.to(device), x, t, a.to(device), b.to(device),
                                          dev_sh, n, err if store else None, mask, chunk_bytes)
            want = T.expand_mse_backward(grad, x.cpu(), t.cpu(), a, b, sh, n,
                                         want_err if store else None, mask, chunk_bytes)
            assert len(got) == 5
            for name, g, w in zip(("dx", "dt", "da", "db", "dshift"), got, want):
                _check(g, w, tol, f"{name} ({what}, mask={mask})")


@pytest.fixture(params=[1, 2])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parallel_splits(backend, threads, layout):
    """Shapes above the CPU passes' grain, so that at 2 threads every pass splits its
    channels over tasks (and the channels-last pack its 64-channel tiles)."""
    mod, device = backend
    dtype, tol = torch.float64, TOL[torch.float64]
    shape = (8, 130, 300, 49, 2)
    x, t, a, b, shift = _expand_inputs(shape, layout, dtype, device, seed=13)
    a, b, shift = a.to(device), b.to(device), shift.to(device)
    grad = torch.tensor(0.3, dtype=dtype)
    for n in (1, 2):
        rows = n * shape[2]
        an, bn = a[:rows], b[:rows]
        store = n == 1
        sq, err = mod.expand_mse_forward(x, t, an, bn, shift, n, store)
        want_sq, want_err = T.expand_mse_forward(x.cpu(), t.cpu(), an.cpu(), bn.cpu(),
                                                 shift.cpu(), n, store)
        _check(sq, want_sq, tol, f"sq n={n}")
        _check(err, want_err, tol, f"err n={n}")
        got = mod.expand_mse_backward(grad.to(device), x, t, an, bn, shift, n,
                                      err if store else None, [True] * 5)
        want = T.expand_mse_backward(grad, x.cpu(), t.cpu(), an.cpu(), bn.cpu(), shift.cpu(), n,
                                     want_err if store else None, [True] * 5)
        for name, g, w in zip(("dx", "dt", "da", "db", "dshift"), got, want):
            _check(g, w, tol, f"{name} n={n}")
    xm = _positions(8, 300, 49, layout, dtype, device, torch.Generator().manual_seed(14), 0.5)
    mean, cov = mod.moments(xm)
    want_mean, want_cov = T.moments(xm.cpu())
    _check(mean, want_mean, tol, "mean")
    _check(cov, want_cov, tol, "cov")
    gc = torch.randn(300, 300, dtype=dtype)
    _check(mod.moments_backward(xm, want_mean.to(device), None, gc.to(device)),
           T.moments_backward(xm.cpu(), want_mean, None, gc), tol, "moments dx")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(backend, dtype):
    """fp16/bf16 x and t: computed in float32, dx/dt returned in the input dtype."""
    mod, device = backend
    shape = (3, 40, 19, 15, 2)
    x, t, a, b, shift = _expand_inputs(shape, "channels_last", dtype, device, seed=5)
    grad = torch.tensor(1.3)
    sq, _ = mod.expand_mse_forward(x, t, a.to(device), b.to(device), shift.to(device), 2, False)
    want_sq, _ = T.expand_mse_forward(x.cpu(), t.cpu(), a, b, shift, 2, False)
    _check(sq, want_sq, 1e-5, "sq")
    got = mod.expand_mse_backward(grad.to(device), x, t, a.to(device), b.to(device),
                                  shift.to(device), 2, None, [True] * 5)
    want = T.expand_mse_backward(grad, x.cpu(), t.cpu(), a, b, shift, 2, None, [True] * 5)
    for name, g, w in zip(("dx", "dt", "da", "db", "dshift"), got, want):
        # dx, dt are rounded to the half dtype: compare at its resolution.
        _check(g, w, 1e-2 if g.dtype == dtype else 1e-5, name)
    mean, cov = mod.moments(x)
    want_mean, want_cov = T.moments(x.cpu())
    _check(mean, want_mean, 1e-5, "mean")
    _check(cov, want_cov, 1e-5, "cov")


class _LargestAllocation(TorchDispatchMode):
    """The element count of the largest tensor any ATen op produces, the extension's
    internal allocations included (they dispatch through this mode too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("B", [1, 3])
def test_direct_path_never_holds_the_expanded_error(backend, B):
    """No n*C_t*P block in the direct path, even when chunk_bytes would allow it and a
    single batch row holds all positions (docs/design.md section 5)."""
    mod, device = backend
    n, C_s, C_t, L = 8, 5, 19, 49
    x, t, a, b, shift = _expand_inputs((B, C_s, C_t, L, n), "contiguous", torch.float32,
                                       device, seed=11)
    a, b, shift = a.to(device), b.to(device), shift.to(device)
    grad = torch.tensor(1.0, device=device)
    with _LargestAllocation() as rec:
        mod.expand_mse_forward(x, t, a, b, shift, n, False)
        mod.expand_mse_backward(grad, x, t, a, b, shift, n, None, [True] * 5)
    assert 0 < rec.largest < n * C_t * B * L


def test_errors(backend):
    mod, device = backend
    x, t, a, b, shift = _expand_inputs((3, 19, 5, 15, 2), "contiguous", torch.float32, device, 7)
    with pytest.raises(ValueError, match="store_error"):
        mod.expand_mse_forward(x, t, a.to(device), b.to(device), None, 2, True)
    with pytest.raises(RuntimeError, match="a must be"):
        mod.expand_mse_forward(x, t, a[1:].to(device), b.to(device), None, 2, False)
    with pytest.raises(RuntimeError, match="t must be"):
        mod.expand_mse_forward(x, t[:2], a.to(device), b.to(device), None, 2, False)
    other = "cuda" if device == "cpu" else "cpu"
    if other == "cpu" or torch.cuda.is_available():
        with pytest.raises(ValueError, match="runs on"):
            mod.moments(x.to(other))


def test_no_compiler_is_not_a_crash(monkeypatch):
    """Without a prebuilt module or a compiler, available() is (False, reason)."""
    monkeypatch.setattr(_extension, "_state", None)
    monkeypatch.setattr(_extension, "_stale_prebuilt", lambda: "pretend: no prebuilt")
    monkeypatch.setattr(_extension, "_compiler", lambda: None)
    ok, why = cpp_backend.available()
    assert not ok and "no C++ compiler" in why
    with pytest.raises(RuntimeError, match="unavailable"):
        cpp_backend.moments(torch.randn(2, 3, 4))


def test_compiler_present_here():
    """CI machines have a compiler: the cpp backend must be there, not silently skipped."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    ok, why = cpp_backend.available()
    assert ok, why
