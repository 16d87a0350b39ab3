"""A draft that reads the target's layers (target_layer_ids) inside vLLM: vLLM's EAGLE-3 aux
hidden states reach it, and it drafts exactly what the reference decoder drafts."""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_random_draft, build_vllm_target
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.reference import ChimeraDrafter, SpeculativeDecoder
from vllm_chimera.tree import TokenTree
from vllm_utils import record_head_drafts, run_engine

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _reference_drafts(target, draft, prompt, num_heads):
    """The reference decoder's chain drafts, step by step (each head's top-1)."""
    drafts = []

    class Recording(ChimeraDrafter):
        def propose(self, token_ids, new_hidden_states, top_k, new_layer_states=None):
            proposal = super().propose(token_ids, new_hidden_states, top_k, new_layer_states)
            drafts.append(proposal[:, 0].tolist())
            return proposal

    result = SpeculativeDecoder(target, Recording(draft), TokenTree.chain(num_heads)).generate(
        torch.tensor(prompt), GREEDY.max_tokens)
    return drafts, result.token_ids


def test_vllm_drafts_what_the_reference_drafts(tmp_path, monkeypatch):
    """Batch 1, greedy: the proposer's drafts at every step equal the reference decoder's
    (same steps, as both accept the same drafts). The draft's fuse is not zero, so its
    drafts depend on the layers: a wrong column, a missing final norm or misaligned rows
    would change nearly every draft of this random draft. Output equals plain."""
    target = build_vllm_target(tmp_path / "target")  # 2 layers: layers 0 and 1 + the last
    draft = build_random_draft(target, num_heads=3, target_layer_ids=[0, 1])
    torch.nn.init.normal_(draft.target_layer_fuse.weight, std=0.2)
    save_draft(draft, tmp_path / "draft")
    recorded = record_head_drafts(monkeypatch)
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(7)).tolist()
    plain = run_engine(tmp_path / "target", [prompt], GREEDY)
    spec = run_engine(tmp_path / "target", [prompt], GREEDY, tmp_path / "draft")
    assert spec.token_ids == plain.token_ids
    expected, reference_tokens = _reference_drafts(target, draft, prompt, 3)
    assert reference_tokens == plain.token_ids[0]
    steps = min(len(recorded), len(expected))
    assert steps >= 10, (len(recorded), len(expected))
    same = sum(a == b for a, b in zip(recorded[:steps], expected[:steps]))
    assert same == steps, list(zip(recorded[:steps], expected[:steps]))
    # And the fuse matters: the same draft without it drafts otherwise.
    blind = build_random_draft(target, num_heads=3, target_layer_ids=[0, 1])
    blind_drafts, _ = _reference_drafts(target, blind, prompt, 3)
    assert sum(a == b for a, b in zip(blind_drafts, expected)) < steps // 2


def test_a_target_without_the_layers_it_reads_is_refused(tmp_path):
    """A draft trained on a target's layer 5 cannot run on a 2-layer target."""
    target = build_vllm_target(tmp_path / "target")
    draft = build_random_draft(target, num_heads=2, target_layer_ids=[0, 1])
    draft.config.target_num_hidden_layers = 6  # as if trained for a deeper target
    draft.config.target_layer_ids = [0, 5]
    save_draft(draft, tmp_path / "draft")
    with pytest.raises(Exception, match="number of layers"):
        run_engine(tmp_path / "target", [[1, 2, 3]], GREEDY, tmp_path / "draft")
