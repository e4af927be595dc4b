"""Counting the device operations of one NORM training step (forward + backward).

A *device operation* is an ATen operator call that launches work on the device, or a
launch of a Triton kernel of norm_fast. The count is taken on CPU: the same operators
are called on CUDA (the host code does not branch on the device type in between, except
`algebra.is_one`, patched here to take CUDA's branch), so it
predicts the host-side launch overhead of a GPU step; what it does not see is how many
device kernels one operator becomes there (a cuDNN convolution backward is one operator
here and two or three kernels there; a cuBLAS GEMM is one of each).

    with LaunchCounter() as counter:
        run one step
    counter.total, counter.aten, counter.triton, counter.by_op

`LaunchCounter` is a TorchDispatchMode that
- skips operators that only make views or metadata or allocate without writing
  (`NO_LAUNCH`: view, as_strided, t, transpose, expand, detach, empty, ...), and counts
  those that copy only when needed (`MAYBE_VIEW`: to, reshape, contiguous, ...) only
  when they did copy;
- runs the bodies of norm_fast's custom ops under itself, so what they call is counted
  (the custom op itself is not: it launches nothing of its own);
- counts each call of `norm_fast.ops.triton.launch.launch` (Triton kernels; under the
  interpreter on CPU tensors, where no ATen operator sees them) as one operation, and
  nothing the interpreter does inside it (its copies of the arguments to and from the
  host do not exist on CUDA).
"""
from __future__ import annotations

import collections
from unittest import mock
from typing import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from norm_fast import algebra, custom_ops
from norm_fast.ops.triton import launch as triton_launch

aten = torch.ops.aten

# Operators that make views, change metadata or allocate uninitialised memory: no kernel.
NO_LAUNCH = {
    aten.view, aten._unsafe_view, aten._reshape_alias, aten.as_strided,
    aten.t, aten.transpose, aten.permute, aten.expand, aten.detach, aten.alias,
    aten.numpy_T, aten.expand_as,
    aten.squeeze, aten.unsqueeze, aten.select, aten.slice, aten.split, aten.unbind,
    aten.diagonal, aten.view_as, aten.unflatten, aten.lift_fresh,
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
    aten.new_empty_strided, aten.split_with_sizes, aten.chunk, aten.narrow,
    aten.set_, aten.resize_, aten.is_same_size, aten.sym_size, aten.sym_stride,
    aten.sym_numel, aten.sym_storage_offset, aten.is_contiguous,
}

# Operators that return their input (or a view of it) when they can, and copy otherwise:
# counted only when the result does not share the input's storage.
MAYBE_VIEW = {aten.to, aten.reshape, aten.contiguous, aten.flatten, aten.type_as,
              aten._to_copy}


def _shares_storage(out, inp) -> bool:
    if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)):
        return False
    return out.untyped_storage().data_ptr() == inp.untyped_storage().data_ptr()


class LaunchCounter(TorchDispatchMode):
    """Counts device operations (see the module docstring) while active."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = collections.Counter()
        self._launch = None
        self._depth = 0
        self._in_launch = 0

    @property
    def triton(self) -> int:
        return sum(v for k, v in self.by_op.items() if k.startswith("triton:"))

    @property
    def aten(self) -> int:
        return sum(v for k, v in self.by_op.items() if not k.startswith("triton:"))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self):
        # Re-entered (without nesting the patch) to run the custom ops' bodies.
        if self._depth == 0:
            original = self._launch = triton_launch.launch

            def counted(kernel, *args, **kwargs):
                fn = getattr(kernel, "fn", kernel)
                self.by_op["triton:" + getattr(fn, "__name__", str(fn))] += 1
                self._in_launch += 1
                try:
                    return original(kernel, *args, **kwargs)
                finally:
                    self._in_launch -= 1

            triton_launch.launch = counted
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            triton_launch.launch = self._launch
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_launch:
            # The interpreter's copies of a kernel's arguments to and from the host: on
            # CUDA the launch is the one operation, counted above.
            return func(*args, **kwargs)
        if func.namespace == "norm_fast":
            # Run the op's Python body under this mode so its inner ops are counted.
            body = getattr(custom_ops, func._opname)._init_fn
            with self:
                return body(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.overloadpacket in MAYBE_VIEW:
            if not _shares_storage(out, args[0] if args else None):
                self.by_op[func.overloadpacket.__name__] += 1  # it copied
        elif func.overloadpacket not in NO_LAUNCH:
            self.by_op[func.overloadpacket.__name__] += 1
        return out


def count_training_step(mod: torch.nn.Module, f_s: torch.Tensor, f_t: torch.Tensor
                        ) -> LaunchCounter:
    """Device operations of ``features, loss = mod(f_s, f_t); (loss + features.sum())
    .backward()`` (the features' sum stands for the classifier's use of them)."""
    counter = LaunchCounter()
    # The one host branch on the device type: on CPU the range-scaling pass is skipped
    # when sigma is 1 (`algebra.is_one`, free there, a sync on CUDA). Count CUDA's route.
    with mock.patch.object(algebra, "is_one", lambda scale: False), counter:
        feats, loss = mod(f_s, f_t)
        (loss + feats.sum()).backward()
    return counter
