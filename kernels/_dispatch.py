"""Choosing between a kernel's Triton implementation and its PyTorch reference.

Every kernel in this package comes as a triple:
    foo_reference(...)  plain PyTorch, runs anywhere, the definition of the kernel's math
    foo_triton(...)     the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
    foo(...)            the dispatcher: `use_triton(*tensors)` picks one of the two

Triton is imported lazily (first Triton call, not `import chimera_kernels`) for two reasons:
  * Triton decides at decoration time whether `triton.jit` makes a compiled or an
    interpreted kernel (TRITON_INTERPRET), so decorating at import would freeze whatever
    the environment was when some unrelated module first imported us;
  * CPU-only users (the reference path) never need Triton at all.
The kernel modules therefore hold their kernels as undecorated functions and call
`jit_kernel(fn)` on first use; `tl` in those modules is a placeholder that `jit_kernel`
binds to `triton.language` (the kernels reference it as a module global, which is where
both the compiler and the interpreter look for it).

Builtins only: the kernels call only Triton builtins (tl.load, tl.dot, tl.where, tl.full,
tl.exp, ...), never the helpers that triton.language itself writes as @triton.jit functions
(tl.zeros, tl.sigmoid, tl.cdiv, tl.softmax, ...). Those helpers are decorated when triton
is imported, so if anything imported triton before TRITON_INTERPRET=1 was set (pytest's
conftest importing transformers does), they stay compiled-mode functions and the
interpreter fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

ENV_VAR = "CHIMERA_KERNELS"
_CHOICES = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    """True iff `import triton` works (it is an install requirement, but be defensive)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_choice() -> str:
    """The value of CHIMERA_KERNELS: 'auto' (default), 'triton' or 'reference'."""
    choice = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {_CHOICES}")
    return choice


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a dispatcher should run the Triton kernel on these inputs.

    CHIMERA_KERNELS=triton / =reference force the choice; otherwise ('auto') Triton runs
    when every given tensor is on CUDA, Triton imports, and autograd does not need to
    differentiate through the call: the kernels are forward-only, so training (e.g. of
    the trigram encoder's W1) takes the differentiable reference. None entries (optional
    arguments that were not passed) are ignored.
    """
    choice = kernel_choice()
    if choice != "auto":
        return choice == "triton"
    tensors = [t for t in tensors if t is not None]
    if needs_grad(*tensors):
        return False
    return all(t.is_cuda for t in tensors) and triton_available()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True iff autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def interpreting() -> bool:
    """True iff Triton would build interpreted kernels right now (TRITON_INTERPRET=1)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def check_triton_device(name: str, *tensors: torch.Tensor | None) -> None:
    """Fail clearly instead of deep inside Triton when a kernel cannot run on these inputs."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not interpreting() and any(d.type != "cuda" for d in devices):
        raise RuntimeError(f"{name}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 "
                           f"to interpret it on CPU), got tensors on {devices.pop()}")


# (kernel function, interpreted?) -> jitted kernel. Keyed on the interpret flag so a test
# that flips TRITON_INTERPRET after a kernel was first built still gets the right kind.
_JITTED: dict[tuple[Callable, bool], Callable] = {}


def jit_kernel(fn: Callable) -> Callable:
    """triton.jit(fn), built on first use. Binds `tl` in fn's module (see module docstring)."""
    import triton
    import triton.language

    fn.__globals__["tl"] = triton.language
    key = (fn, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


CHECK_ENV_VAR = "CHIMERA_KERNELS_CHECK"


def values_readable(*tensors: torch.Tensor | None) -> bool:
    """Whether a wrapper may read the *values* of these (small index) tensors for its checks.

    Reading a CUDA tensor on the host (.tolist(), .item(), int(t)) is a device-to-host copy
    that waits for every kernel queued before it: a pipeline stall on every call of a kernel
    that runs once per decoding step, and illegal during CUDA graph capture. So values are
    read only where that is free (CPU tensors; e.g. the tests, the CPU path) or when
    CHIMERA_KERNELS_CHECK=1 asks for it (debugging on a GPU; never during capture). Shape and
    dtype checks always run. Meta tensors (used to enumerate launches) have no values.
    """
    tensors = [t for t in tensors if t is not None]
    if any(t.is_meta for t in tensors):
        return False
    if all(t.device.type == "cpu" for t in tensors):
        return True
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get(CHECK_ENV_VAR, "").strip() == "1"


@dataclass(frozen=True)
class KernelLaunch:
    """One launch of a kernel, as a wrapper computes it from shapes (never from values).

    The wrappers build this and run it; chimera_kernels.launches builds the same record
    from meta tensors to enumerate (and compile ahead of time) what the dispatch code
    launches, so the two can never drift apart.
    """

    kernel: Callable  # the undecorated kernel function (jit_kernel decorates it)
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments by name: tensors and ints
    constexprs: dict[str, Any]  # tl.constexpr arguments by name

    def run(self):
        """Launch on the tensors' device; returns Triton's compiled kernel."""
        return jit_kernel(self.kernel)[self.grid](**self.args, **self.constexprs)


INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {torch.int32: "int32", torch.int64: "int64", torch.float32: "fp32",
                torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_tensor(kernel: str, name: str, tensor: torch.Tensor, ndim: int, dtypes: tuple,
                 shape: str, non_empty: bool = False) -> None:
    """Raise ValueError unless `tensor` has `ndim` dims, a dtype in `dtypes` (and rows).

    e.g. check_tensor("trigram_encoder", "token_ids", x, 1, INDEX_DTYPES, "[num_tokens]") on
    a float x: "trigram_encoder: token_ids must be a 1-D int32/int64 tensor [num_tokens],
    got torch.float32 of shape (5,)".
    """
    if tensor.dim() != ndim or (non_empty and tensor.shape[0] < 1) or tensor.dtype not in dtypes:
        kinds = "/".join(_DTYPE_NAMES[d] for d in dtypes)
        raise ValueError(f"{kernel}: {name} must be a {'non-empty ' if non_empty else ''}"
                         f"{ndim}-D {kinds} tensor {shape}, got {tensor.dtype} of shape "
                         f"{tuple(tensor.shape)}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (grid sizes)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1); tl.arange needs power-of-two block sizes."""
    return 1 << max(n - 1, 0).bit_length()
