"""The reference-decoder half of `chimera-demo --toy` (no vLLM, no download).

A tiny random Llama target built in a temporary folder: greedy speculative output equals
plain output, with a random draft (mostly rejected) and with an oracle draft (always
accepted), for a chain and a tree.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from vllm_chimera.checkpoint import load_draft_for_target, save_draft
from vllm_chimera.config import ChimeraConfig
from vllm_chimera.model import ChimeraDraftModel
from vllm_chimera.reference import (ChimeraDrafter, SpeculativeDecoder, TargetOracleDrafter,
                                    generate_plain)
from vllm_chimera.tree import TokenTree

DEMO_TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)]


@dataclass
class DemoSettings:
    num_heads: int = 4
    num_prompts: int = 4
    max_new_tokens: int = 64
    seed: int = 0


def _tiny_target(folder: str, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, initializer_range=0.3,
                         architectures=["LlamaForCausalLM"])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def run_demo(settings: DemoSettings) -> bool:
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        target = _tiny_target(f"{tmp}/target", settings.seed)
        draft = ChimeraDraftModel(ChimeraConfig.for_target(target.config,
                                                           num_decoding_heads=settings.num_heads))
        save_draft(draft, f"{tmp}/draft")  # exercise the real save/load path
        draft = load_draft_for_target(f"{tmp}/draft", target).eval()
        g = torch.Generator().manual_seed(settings.seed)
        prompts = [torch.randint(0, 512, (n,), generator=g) for n in range(3, 3 + 5 * settings.num_prompts, 5)]
        print(f"tiny random Llama target (d=128, 4 layers, V=512), {len(prompts)} prompts, "
              f"{settings.max_new_tokens} greedy tokens each, K={settings.num_heads}")
        print(f"{'drafter':<24}{'verification':<14}{'tokens/step':>12}{'exact':>8}{'seconds':>10}")
        plain = [generate_plain(target, p, settings.max_new_tokens).token_ids for p in prompts]
        all_exact = True
        for drafter_name, drafter in [("chimera (untrained)", ChimeraDrafter(draft)),
                                      ("oracle (target itself)", TargetOracleDrafter(target, settings.num_heads))]:
            for tree_name, tree in [("chain", TokenTree.chain(settings.num_heads)),
                                    ("tree", TokenTree.from_paths(DEMO_TREE))]:
                decoder = SpeculativeDecoder(target, drafter, tree)
                start = time.perf_counter()
                results = [decoder.generate(p, settings.max_new_tokens) for p in prompts]
                seconds = time.perf_counter() - start
                exact = all(r.token_ids == ref for r, ref in zip(results, plain))
                all_exact &= exact
                steps = [n for r in results for n in r.accept_lengths]
                print(f"{drafter_name:<24}{tree_name:<14}{sum(steps) / len(steps):>12.2f}"
                      f"{'yes' if exact else 'NO':>8}{seconds:>10.2f}")
        print("greedy speculative output equals plain output:", "yes" if all_exact else "NO")
        return all_exact


