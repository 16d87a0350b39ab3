"""Where an engine step's time goes (chimera-bench): a measuring patch, never installed by
the plugin (the runtime's patches are vllm_chimera/vllm/patches.py's PATCHES)."""
from __future__ import annotations

import time

import torch

from vllm_chimera.vllm.patching import ClassPatch


class StepTimingPatch(ClassPatch):
    """Wall time of the target's forward passes, of sampling + verification and of
    drafting, summed over engine steps. Not in PATCHES: only chimera-bench installs it, in
    its own per-method process. On a GPU it synchronises around each timed call (CUDA runs
    asynchronously), which itself costs time: run `chimera-bench --no-step-times` there for
    the headline figures.
    """

    target = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    replaces = ("_model_forward", "sample_tokens", "propose_draft_token_ids")
    totals: dict[str, float] = {}
    _synchronize = staticmethod(lambda: None)  # the device's synchronize (none on CPU)

    @classmethod
    def reset(cls) -> None:
        cls.totals = {"forward_s": 0.0, "sample_s": 0.0, "draft_s": 0.0, "num_forward": 0}
        if torch.accelerator.is_available():
            cls._synchronize = staticmethod(torch.accelerator.synchronize)

    @classmethod
    def _timed(cls, key: str, function, *args, **kwargs):
        cls._synchronize()
        start = time.perf_counter()
        result = function(*args, **kwargs)
        cls._synchronize()
        cls.totals[key] = cls.totals.get(key, 0.0) + time.perf_counter() - start
        return result

    @staticmethod
    def _model_forward(original, self, *args, **kwargs):
        StepTimingPatch.totals["num_forward"] = StepTimingPatch.totals.get("num_forward", 0) + 1
        return StepTimingPatch._timed("forward_s", original, self, *args, **kwargs)

    @staticmethod
    def sample_tokens(original, self, *args, **kwargs):  # includes drafting (below)
        return StepTimingPatch._timed("sample_s", original, self, *args, **kwargs)

    @staticmethod
    def propose_draft_token_ids(original, self, *args, **kwargs):
        return StepTimingPatch._timed("draft_s", original, self, *args, **kwargs)
