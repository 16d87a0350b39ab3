"""A second architecture inside vLLM: a tiny random Qwen2 target (attention biases, an
untied or tied LM head, as Qwen2.5 models come) with a Chimera draft. Greedy output equals
plain vLLM's, and the proposer's drafts equal the reference decoder's on Hugging Face's
Qwen2: the draft reads the target's hidden states, embedding table and LM head as they are."""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_random_draft, build_vllm_target
from test_vllm_target_layers import GREEDY, _reference_drafts
from vllm_chimera.checkpoint import save_draft
from vllm_utils import record_head_drafts, run_engine

vllm = pytest.importorskip("vllm")


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_target_greedy_equals_plain_and_drafts_match_reference(tmp_path, monkeypatch, tied):
    target = build_vllm_target(tmp_path / "target", model_type="qwen2", tie_word_embeddings=tied)
    attention = target.model.layers[0].self_attn
    assert target.config.model_type == "qwen2" and attention.q_proj.bias.abs().sum() > 0
    head_is_embedding = target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    assert head_is_embedding == tied
    draft = build_random_draft(target, num_heads=3)
    assert draft.config.target_model_type == "qwen2"
    save_draft(draft, tmp_path / "draft")
    recorded = record_head_drafts(monkeypatch)
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(7)).tolist()
    plain = run_engine(tmp_path / "target", [prompt], GREEDY)
    spec = run_engine(tmp_path / "target", [prompt], GREEDY, tmp_path / "draft")
    assert len(plain.token_ids[0]) == GREEDY.max_tokens and len(set(plain.token_ids[0])) > 5
    assert spec.token_ids == plain.token_ids
    assert spec.counter("vllm:spec_decode_num_drafts") > 0
    expected, reference_tokens = _reference_drafts(target, draft, prompt, 3)
    assert reference_tokens == plain.token_ids[0]  # vLLM's Qwen2 = Hugging Face's
    steps = min(len(recorded), len(expected))
    assert steps >= 10, (len(recorded), len(expected))
    assert recorded[:steps] == expected[:steps]
