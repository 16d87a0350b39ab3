"""Running real vLLM engines in tests (CPU, fp32, in-process engine core)."""
from __future__ import annotations

import os

# Set before vLLM is imported: an in-process engine starts in ~2 s instead of ~8 s.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm_chimera.checkpoint import load_config  # noqa: E402
from vllm_chimera.harness.offline import OfflineRun, run_offline  # noqa: E402

# Eager: an engine starts in seconds, where compile mode spends ~15 s compiling. Tests of
# compile mode (vLLM's default, what users run) override it: test_vllm_compile_mode.py.
TEST_ENGINE = dict(kv_cache_memory_bytes=64 << 20, max_model_len=512, enforce_eager=True)


def run_engine(target_dir, prompts, sampling_params, draft_dir=None, method="chimera",
               num_rounds=1, lookup=False, tree=None, **engine_kwargs) -> OfflineRun:
    """One engine run; with `draft_dir`, Chimera (method=None: detected from the draft).

    The context lookup is off unless asked for (`lookup`: True or its settings), so that
    the drafts are the heads' alone, as in the reference decoder; `tree`: the
    speculative_config tree (paths or "auto"), none by default. K is all the draft's heads
    at every batch size, as the reference decoder drafts (nothing is measured of a test's
    draft, and vLLM's default would step aside from batch 4 on: spec_config)."""
    spec = None
    if draft_dir is not None:
        spec = {"model": str(draft_dir), "lookup": lookup,
                "num_speculative_tokens": load_config(draft_dir).num_decoding_heads}
        if tree is not None:
            spec["tree"] = tree
        if method is not None:
            spec["method"] = method
    return run_offline(target_dir, prompts, sampling_params, spec, num_rounds,
                       **{**TEST_ENGINE, **engine_kwargs})


def record_head_drafts(monkeypatch) -> list:
    """A list that collects every row of head drafts the ChimeraProposer makes (in-process
    engines), to compare with the reference decoder's drafts step by step."""
    from vllm_chimera.vllm.proposer import ChimeraProposer

    recorded = []
    original = ChimeraProposer._draft_tokens

    def recording(self, h, s, num_tokens, next_token_ids):
        drafts = original(self, h, s, num_tokens, next_token_ids)
        recorded.extend(drafts.tolist())
        return drafts

    monkeypatch.setattr(ChimeraProposer, "_draft_tokens", recording)
    return recorded
