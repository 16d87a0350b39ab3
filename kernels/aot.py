"""Compile a kernel launch ahead of time for an NVIDIA GPU that is not here, and read its spills.

Triton ships ptxas, so `triton.compile` builds the real cubin for sm_80 / sm_90 on a CPU-only
machine; ptxas's own report (registers, stack frame, spill stores and loads) is what a GPU
would load. Used by tests/test_kernels_aot.py; also a command:

    python -m chimera_kernels.aot            # the default subset, sm_80 and sm_90, one line each
    python -m chimera_kernels.aot --full     # every launch (minutes)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chimera_kernels._dispatch import KernelLaunch, jit_kernel

ARCHS = (80, 90)  # A100 (sm_80), H100/H200 (sm_90; Triton compiles sm_90a)
WARP_SIZE = 32  # every NVIDIA GPU


@dataclass(frozen=True)
class CompileReport:
    """ptxas's report on one compiled kernel."""

    arch: int
    seconds: float
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    ptx: str

    @property
    def spill_bytes(self) -> int:
        return max(self.spill_store_bytes, self.spill_load_bytes)


@contextlib.contextmanager
def _environment(**values: str | None):
    """Set (or, for None, remove) environment variables for the duration; Triton reads its
    knobs from the environment when it uses them."""
    previous = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def compile_launch(launch: KernelLaunch, arch: int, cache_dir: str | Path) -> CompileReport:
    """Compile `launch` exactly as JITFunction.run would on an sm_<arch> GPU; raises on a compile error.

    cache_dir: an empty folder, so that nothing comes from (or goes to) a user's Triton
    cache and ptxas really runs (its report is only printed when it does).
    """
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    from chimera_kernels.launches import specialization

    spec = specialization(launch)
    names = list(spec)
    signature = {name: kind for name, (kind, _) in spec.items()}
    constexprs = {(names.index(name),): value for name, (kind, value) in spec.items() if kind == "constexpr"}
    attrs = {(names.index(name),): BaseBackend.parse_attr(value) for name, (kind, value) in spec.items()
             if kind != "constexpr" and isinstance(value, str)}
    log = io.StringIO()
    with _environment(TRITON_INTERPRET=None, TRITON_CACHE_DIR=str(cache_dir), TRITON_DUMP_PTXAS_LOG="1",
                      TRITON_DEFAULT_FP_FUSION="1"), contextlib.redirect_stdout(log):
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(jit_kernel(launch.kernel), signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, WARP_SIZE))
        seconds = time.perf_counter() - start
    frame, registers = _PTXAS_FRAME.search(log.getvalue()), _PTXAS_REGISTERS.search(log.getvalue())
    if frame is None or registers is None:
        raise RuntimeError(f"no ptxas report in the compile output:\n{log.getvalue()}")
    stack, stores, loads = map(int, frame.groups())
    return CompileReport(arch, seconds, int(registers.group(1)), stack, stores, loads, compiled.asm["ptx"])


def main() -> None:
    from chimera_kernels.launches import launch_configs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every launch, not the default subset")
    parser.add_argument("--arch", type=int, action="append", help=f"default: {ARCHS}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(launch_configs(full=args.full)):
            for arch in args.arch or ARCHS:
                report = compile_launch(config.launch(), arch, Path(tmp) / f"{i}-{arch}")
                print(f"sm_{arch} {report.seconds:5.1f} s {report.registers:3d} regs "
                      f"spills {report.spill_store_bytes:5d}/{report.spill_load_bytes:5d} B  "
                      f"{config.describe()}", flush=True)


if __name__ == "__main__":
    main()
