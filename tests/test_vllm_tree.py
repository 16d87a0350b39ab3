"""Token trees inside real vLLM engines (CPU, fp32): tree output == plain output.

The trees here are wide (8 candidates at depth 1 over a 32-token vocabulary), so that a
random draft has a node accepted at depth 1 in about a quarter of the steps, usually not
the first child: those steps need every piece (the mask, the depth positions, the
acceptance rule, the path compaction and KV move) to give plain vLLM's next tokens.
"""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_permutation_pair, build_random_draft, build_vllm_target
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.reference import ChimeraDrafter, SpeculativeDecoder
from vllm_chimera.tree import TokenTree
from vllm_utils import run_engine

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from vllm_chimera.vllm import tree_verify  # noqa: E402

VOCAB = 32
# 8 + 16 + 4 = 28 drafted nodes, depths 1..3.
WIDE_TREE = ([[r] for r in range(8)] + [[r, q] for r in range(4) for q in range(4)]
             + [[r, q, 0] for r in range(2) for q in range(2)])
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _prompts(num_prompts, vocab=VOCAB, seed=0, lengths=(1, 3, 7, 12, 20, 33, 5, 48)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(num_prompts)]


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A random 32-token target (its attention matters) and a random draft."""
    folder = tmp_path_factory.mktemp("tree_pair")
    target = build_vllm_target(folder / "target", vocab_size=VOCAB)
    draft = build_random_draft(target, num_heads=4)
    save_draft(draft, folder / "draft")
    return folder / "target", folder / "draft", target, draft


@pytest.fixture(scope="module")
def plain_small(small_pair):
    return run_engine(small_pair[0], _prompts(8), GREEDY)


def _reference_accepted(target, draft, prompts, tree, max_tokens) -> int:
    decoder = SpeculativeDecoder(target, ChimeraDrafter(draft), tree)
    accepted = 0
    for prompt in prompts:
        result = decoder.generate(torch.tensor(prompt), max_tokens)
        accepted += sum(n - 1 for n in result.accept_lengths)
    return accepted


@pytest.mark.parametrize("num_prompts", [1, 8])
def test_tree_greedy_equals_plain_and_matches_reference(small_pair, plain_small, num_prompts):
    target_dir, draft_dir, target, draft = small_pair
    prompts = _prompts(num_prompts)
    tree_verify.STATS.reset()
    spec = run_engine(target_dir, prompts, GREEDY, draft_dir, tree=WIDE_TREE)
    assert spec.token_ids == plain_small.token_ids[:num_prompts]
    stats = tree_verify.STATS
    assert stats.num_trees > 0 and stats.num_nodes == stats.num_trees * len(WIDE_TREE)
    # Paths reached depth 2: non-first children were accepted and compacted.
    assert len(stats.num_accepted_per_depth) >= 2, stats
    # vLLM's per-position counters are the per-depth counts.
    per_position = spec.metrics["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert per_position[: len(stats.num_accepted_per_depth)] == stats.num_accepted_per_depth
    # Per node: each depth's accepted nodes add up to that depth's count, and only nodes
    # of the tree are named.
    assert set(stats.num_accepted_per_path) <= {tuple(p) for p in WIDE_TREE}
    assert [sum(n for p, n in stats.num_accepted_per_path.items() if len(p) == depth + 1)
            for depth in range(len(stats.num_accepted_per_depth))] == stats.num_accepted_per_depth
    assert any(p[-1] > 0 for p in stats.num_accepted_per_path)  # non-top-1 nodes accepted
    tree = TokenTree.from_paths(WIDE_TREE)
    assert spec.counter("vllm:spec_decode_num_accepted_tokens") == _reference_accepted(
        target, draft, prompts, tree, GREEDY.max_tokens)


def test_tree_auto_without_measurements_drafts_chains(small_pair, plain_small):
    """A draft measured on no machine: tree "auto" starts (no refusal) and drafts chains
    (spec_config.TreeSettings._auto)."""
    target_dir, draft_dir = small_pair[:2]
    tree_verify.STATS.reset()
    spec = run_engine(target_dir, _prompts(8), GREEDY, draft_dir, tree="auto")
    assert spec.token_ids == plain_small.token_ids
    assert tree_verify.STATS.num_trees == 0 and spec.counter("vllm:spec_decode_num_drafts") > 0


def test_tree_with_an_accepting_draft(tmp_path):
    """The permutation pair: the heads' best candidates are right for 3/4 of the tokens;
    the tree adds their runners-up. Output == plain; accepted == the reference's."""
    target, draft, _ = build_permutation_pair(tmp_path, num_heads=4, num_wrong=32)
    save_draft(draft, tmp_path / "draft")
    tree = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]
    prompts = _prompts(8, 128, seed=1)
    plain = run_engine(tmp_path / "target", prompts, GREEDY)
    spec = run_engine(tmp_path / "target", prompts, GREEDY, tmp_path / "draft", tree=tree)
    assert spec.token_ids == plain.token_ids
    assert spec.mean_acceptance_length > 2.5
    assert spec.counter("vllm:spec_decode_num_accepted_tokens") == _reference_accepted(
        target, draft, prompts, TokenTree.from_paths(tree), GREEDY.max_tokens)


def test_tree_under_chunked_prefill_preemption_prefix_caching_and_mixed_batches(small_pair):
    """Long prompts in 64-token chunks, a KV cache too small for the batch, requests that
    must draft chains (a presence penalty) beside tree requests; then prompts sharing a
    300-token prefix, twice in one engine (prefix-cache hits)."""
    target_dir, draft_dir, _, _ = small_pair
    prompts = _prompts(16, seed=2, lengths=(60, 90, 45, 120))
    params = [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True,
                             presence_penalty=0.5 if i % 3 == 0 else 0.0)
              for i in range(len(prompts))]
    small = dict(enable_chunked_prefill=True, max_num_batched_tokens=64, max_num_seqs=8,
                 kv_cache_memory_bytes=600 << 10, max_model_len=256)
    plain = run_engine(target_dir, prompts, params)
    tree_verify.STATS.reset()
    spec = run_engine(target_dir, prompts, params, draft_dir, tree=WIDE_TREE, **small)
    assert spec.token_ids == plain.token_ids
    assert spec.counter("vllm:num_preemptions") > 0, "the KV cache did not force preemption"
    assert len(tree_verify.STATS.num_accepted_per_depth) >= 1
    # The penalised requests drafted chains (K = 4): fewer drafts than trees would give.
    assert spec.counter("vllm:spec_decode_num_draft_tokens") < (
        spec.counter("vllm:spec_decode_num_drafts") * len(WIDE_TREE))

    shared = _prompts(1, seed=3, lengths=(300,))[0]  # longer than a KV block (128 on CPU)
    prompts = [shared + tail for tail in _prompts(4, seed=4)]
    plain = run_engine(target_dir, prompts, GREEDY)
    spec = run_engine(target_dir, prompts, GREEDY, draft_dir, tree=WIDE_TREE, num_rounds=2,
                      enable_prefix_caching=True)
    assert spec.token_ids == plain.token_ids + plain.token_ids
    assert spec.counter("vllm:prefix_cache_hits") > 0


def test_tree_sampling_follows_the_target_distribution(tmp_path):
    """Temperature 0.8 with a tree: how often token t+1 = pi(token t), vs plain sampling
    (as the chain's test in test_vllm_engine.py: 3000 transitions per run, standard error
    about 0.01, tolerance 0.04). Accepting any candidate without the rejection rule
    would push the rate towards 1."""
    target, draft, pi = build_permutation_pair(tmp_path, num_heads=3, logit_scale=0.34)
    save_draft(draft, tmp_path / "draft")
    prompts = _prompts(600, 128, seed=5, lengths=(4, 9))
    tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    rates = {}
    for name, draft_dir in [("plain", None), ("tree", tmp_path / "draft")]:
        params = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True)
        tree_verify.STATS.reset()
        run = run_engine(tmp_path / "target", prompts, params, draft_dir,
                         tree=tree if draft_dir else None)
        follows = [int(pi[seq[j]]) == seq[j + 1] for seq in run.token_ids for j in range(5)]
        rates[name] = sum(follows) / len(follows)
        if draft_dir is not None:
            assert tree_verify.STATS.num_trees > 1000
            assert run.counter("vllm:spec_decode_num_accepted_tokens") > 100
    assert 0.35 < rates["plain"] < 0.65, rates
    assert abs(rates["tree"] - rates["plain"]) < 0.04, rates


@pytest.mark.parametrize("tree, engine, message", [
    ([[0], [0, 0, 1, 0]], {}, "no parent path"),
    ([[0], [16]], {}, "beyond the heads' top-16"),
    ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]], {}, "more than the draft's 4"),
    ([[r] for r in range(12)], {"max_num_batched_tokens": 8, "max_num_seqs": 4},
     "at most max_num_batched_tokens - 1 = 7"),
    ("best", {}, "must be 'auto' or a list of paths"),
    ([[0], ["a"]], {}, "list of top-k ranks"),
])
def test_bad_trees_fail_at_start_up(small_pair, tree, engine, message):
    target_dir, draft_dir, _, _ = small_pair
    with pytest.raises(Exception, match=message):
        run_engine(target_dir, _prompts(1), GREEDY, draft_dir, tree=tree, **engine)


def test_tree_is_a_chimera_setting(small_pair):
    with pytest.raises(Exception, match="setting of the 'chimera' method"):
        run_engine(small_pair[0], _prompts(1), GREEDY, small_pair[1], method="ngram",
                   tree=[[0]])
