"""Confident chains (speculative_config["min_confidence"]) inside real vLLM engines (CPU,
fp32): each request's chain of head drafts is cut where the heads' confidence falls below
the threshold; outputs stay the target's own."""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_permutation_pair
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.harness.offline import run_offline
from vllm_chimera.vllm.spec_config import parse_min_confidence
from vllm_utils import TEST_ENGINE

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from vllm_chimera.model import confident_lengths  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def test_confident_lengths_worked_example():
    probs = torch.tensor([[0.9, 0.5, 0.8], [0.3, 0.9, 0.9], [1.0, 1.0, 0.99]])
    assert confident_lengths(probs, 0.4).tolist() == [2, 1, 3]  # (the docstring's example)
    assert confident_lengths(probs, 0.01).tolist() == [3, 3, 3]
    assert confident_lengths(probs, 0.999).tolist() == [1, 1, 2]  # head 0 always drafts


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.2, True, "0.5", [0.5]])
def test_bad_min_confidence_is_a_clear_error(value):
    with pytest.raises(ValueError, match="min_confidence must be a number in"):
        parse_min_confidence(value)
    assert parse_min_confidence(None) is None and parse_min_confidence(0.25) == 0.25


def test_confident_chains_inside_vllm(tmp_path):
    """The permutation draft with head 2 softened (its down projection x 0.3): heads 0, 1
    and 3 put probability 1.0 on their top-1 token, head 2 only 0.665 (for every token).
    So at min_confidence 0.9 every chain stops after head 1 (2 drafts), at 0.5 none is cut
    (1 * 1 * 0.665 * 1 >= 0.5); the outputs are plain decoding's either way."""
    target, draft, pi = build_permutation_pair(tmp_path, num_heads=4, num_wrong=32)
    with torch.no_grad():
        draft.heads[2].down.weight.mul_(0.3)
    save_draft(draft, tmp_path / "draft")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (6,), generator=g).tolist() for _ in range(6)]

    def run(min_confidence=None):
        spec = {"method": "chimera", "model": str(tmp_path / "draft"), "lookup": False,
                "num_speculative_tokens": 4}
        if min_confidence is not None:
            spec["min_confidence"] = min_confidence
        result = run_offline(tmp_path / "target", prompts, GREEDY, spec, **TEST_ENGINE)
        return result, (result.counter("vllm:spec_decode_num_drafts"),
                        result.counter("vllm:spec_decode_num_draft_tokens"))

    plain = run_offline(tmp_path / "target", prompts, GREEDY, None, **TEST_ENGINE)
    (full, (num_drafts, num_tokens)), (cut, (cut_drafts, cut_tokens)) = run(), run(0.9)
    (loose, (loose_drafts, loose_tokens)) = run(0.5)
    assert full.token_ids == plain.token_ids == cut.token_ids == loose.token_ids
    assert num_drafts > 0 and num_tokens == 4 * num_drafts
    assert cut_drafts > 0 and cut_tokens == 2 * cut_drafts
    assert loose_tokens == 4 * loose_drafts


def test_min_confidence_is_chimeras_and_needs_a_threshold_in_the_bench():
    from vllm.config import SpeculativeConfig

    from vllm_chimera.commands.bench import bench_main

    with pytest.raises(Exception, match="is a setting of the 'chimera' method"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_max=2,
                          min_confidence=0.5)
    with pytest.raises(SystemExit):
        bench_main(["--target", "x", "--draft", "d", "--methods", "plain,chimera-confident"])
    with pytest.raises(SystemExit):
        bench_main(["--target", "x", "--draft", "d", "--methods", "plain,chimera-confident",
                    "--min-confidence", "1.5"])


def test_confident_chains_of_sequential_heads(tmp_path):
    """Sequential heads that know the target only through the token before (toy), head 1
    softened (its token_up x 0.3: top-1 probability 0.665, still right): at 0.9 the heads
    stop after head 1 and every chain is head 0's token alone; at 0.5 none is cut."""
    target, draft, pi = build_permutation_pair(tmp_path, num_heads=4, sequential=True)
    with torch.no_grad():
        draft.heads[1].token_up.weight.mul_(0.3)
    save_draft(draft, tmp_path / "draft")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (6,), generator=g).tolist() for _ in range(4)]
    spec = {"method": "chimera", "model": str(tmp_path / "draft"), "lookup": False,
            "num_speculative_tokens": 4}
    plain = run_offline(tmp_path / "target", prompts, GREEDY, None, **TEST_ENGINE)
    for min_confidence, num_tokens in ((0.9, 1), (0.5, 4)):
        run = run_offline(tmp_path / "target", prompts, GREEDY,
                          {**spec, "min_confidence": min_confidence}, **TEST_ENGINE)
        assert run.token_ids == plain.token_ids
        num_drafts = run.counter("vllm:spec_decode_num_drafts")
        assert num_drafts > 0
        assert run.counter("vllm:spec_decode_num_draft_tokens") == num_tokens * num_drafts
        assert run.acceptance_rate == 1.0  # every head is right, softened or not
