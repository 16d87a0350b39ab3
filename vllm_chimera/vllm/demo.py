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
    from vllm_chimera.vllm.offline import compare

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, draft, _ = build_permutation_pair(folder, num_heads=4, num_wrong=32, seed=seed)
        save_draft(draft, folder / "draft")
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, 128, (4 + 3 * i,), generator=g).tolist() for i in range(num_prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        print(f"\nvLLM (CPU, fp32): toy permutation target + toy Chimera draft (K=4), "
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
