"""Backend choice for the fused ops: Triton kernels or the PyTorch path.

`AXPO_KERNEL_BACKEND` selects the backend:

- ``auto`` (default): CUDA tensors use the Triton kernels, everything else the PyTorch path.
- ``triton``: always the Triton kernels. On CPU tensors they run through Triton's interpreter,
  which needs ``TRITON_INTERPRET=1`` set before triton is imported (see `triton_fn`); slow,
  meant for tests.
- ``torch``: always the PyTorch path (it is device-generic, so this also works on CUDA).

The variable is read on every call, so tests can flip it with ``monkeypatch.setenv``. If Triton
cannot be imported, ``triton`` falls back to ``torch`` with a single warning (as flash-attn does
for its optional extension).
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # Triton is optional at run time (e.g. macOS, or a CPU-only wheel without it).
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

_BACKENDS = ("auto", "triton", "torch")
_warned = False


def backend_for(*tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose inputs are `tensors`."""
    global _warned
    choice = os.environ.get("AXPO_KERNEL_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"AXPO_KERNEL_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if not HAS_TRITON:
        if choice == "triton" and not _warned:
            warnings.warn("AXPO_KERNEL_BACKEND=triton but triton is not importable; using torch")
            _warned = True
        return "torch"
    if choice == "triton":
        return "triton"
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    return "triton" if on_cuda else "torch"


def triton_fn(kernel, device: torch.device):
    """The launchable form of a `@triton.jit` kernel for tensors on `device`.

    On CUDA, the kernel itself. On CPU tensors the kernels can only run through Triton's
    interpreter, and `triton.jit` picks compile-or-interpret when a module is *imported* - for
    Triton's own `@jit` helpers (`tl.zeros`, `tl.sum`, ...) too - so TRITON_INTERPRET=1 must be set
    before `triton` is first imported. Re-wrapping our kernels after the fact is not enough (the
    helpers stay compiled-only), hence the explicit error instead of a confusing one from inside
    the interpreter.
    """
    if device.type == "cuda":
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"the Triton backend on {device.type} tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use AXPO_KERNEL_BACKEND=torch|auto"
        )
    return kernel


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Test mode: every scratch or output buffer the ops allocate with `empty` (instead of
# `torch.empty`) is filled with NaN, so a value that is read before it is written (stale memory)
# shows up as NaN in the results. tests/kernels set it with monkeypatch; off in normal runs.
POISON_EMPTY = os.environ.get("AXPO_KERNELS_POISON_EMPTY", "") == "1"


def empty(*shape, device, dtype):
    """`torch.empty`, or NaN-filled under POISON_EMPTY (floating dtypes only)."""
    if POISON_EMPTY and dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t.contiguous()`, spelled as a clone so it also traces under FakeTensorMode with CUDA fake
    tensors on a CPU-only torch build (`Tensor.contiguous` and Python indexing take a CUDA device
    guard there and fail; `clone`, `narrow`, `select` and `index_select` do not)."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def check_same_device(op: str, **tensors):
    """Raise if the tensor arguments of `op` are not all on one device.

    Called by every public op before it reaches its custom op, so a CPU tensor mixed into CUDA
    inputs fails with a clear message in eager mode, under torch.compile and under FakeTensorMode
    alike (a custom op's fake implementation would otherwise accept the mix silently).
    """
    devs = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devs.items())
        raise ValueError(f"{op}: all tensor arguments must be on one device, got {listed}")
