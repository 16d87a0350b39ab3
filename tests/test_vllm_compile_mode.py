"""Chimera inside vLLM at its default compilation (CPU: compile mode), not enforce_eager.

Compile mode is what users run, and it is the only CPU path where vLLM warms the drafter
up at start-up (`profile_run` -> `ChimeraProposer.dummy_run`, as on every GPU start).
vLLM's K (num_speculative_tokens) is then the largest of the heads' K, the lookup's
tokens and the tree's nodes: here 8 > 4 heads, which once crashed parallel heads
(IndexError in dummy_run). Both head kinds start, warm up, and give plain's greedy output.
"""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_random_draft, build_vllm_target
from vllm_chimera.checkpoint import save_draft
from vllm_utils import run_engine

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from vllm_chimera.vllm.proposer import ChimeraProposer  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB = 32
SEVEN_NODE_TREE = [[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 1]]  # root + 6 drafted nodes
LONG_LOOKUP = {"num_tokens": 8}  # longer than the draft's 4 heads
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
COMPILE_MODE = dict(enforce_eager=False)  # vLLM's default compilation on CPU


def _prompts():
    g = torch.Generator().manual_seed(3)
    # Repeats inside the prompts give the lookup matches; random ones leave it to the heads.
    repeated = [5, 6, 7, 8, 9, 10, 11, 12] * 3
    return [repeated, torch.randint(0, VOCAB, (9,), generator=g).tolist(), [1, 2, 3]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile_mode")
    target = build_vllm_target(folder / "target", vocab_size=VOCAB)
    for kind, sequential in (("parallel", False), ("sequential", True)):
        save_draft(build_random_draft(target, num_heads=4, sequential_heads=sequential),
                   folder / kind)
    return folder


@pytest.fixture(scope="module")
def plain(folders):
    return run_engine(folders / "target", _prompts(), GREEDY, **COMPILE_MODE)


@pytest.mark.parametrize("heads", ["parallel", "sequential"])
def test_compile_mode_warms_up_trees_and_long_lookups_and_equals_plain(
        folders, plain, heads, monkeypatch):
    warm_ups = []
    original = ChimeraProposer.dummy_run

    def counted(self, num_tokens, *args, **kwargs):
        warm_ups.append((num_tokens, self.num_speculative_tokens, len(self.model.heads)))
        return original(self, num_tokens, *args, **kwargs)

    monkeypatch.setattr(ChimeraProposer, "dummy_run", counted)
    spec = run_engine(folders / "target", _prompts(), GREEDY, folders / heads,
                      lookup=LONG_LOOKUP, tree=SEVEN_NODE_TREE, **COMPILE_MODE)
    assert warm_ups, "vLLM's compile mode should warm the drafter up at start-up"
    assert all(k == 8 and num_heads == 4 for _, k, num_heads in warm_ups), warm_ups
    assert spec.token_ids == plain.token_ids
    assert spec.counter("vllm:spec_decode_num_drafts") > 0
