"""The core property: speculative decoding gives exactly the target's outputs."""
import pytest
import torch

from vllm_chimera.reference import (ChimeraDrafter, SpeculativeDecoder, TargetOracleDrafter,
                                    generate_plain)
from vllm_chimera.tree import TokenTree

from conftest import build_random_draft, build_tiny_target

TREES = {
    "small-tree": [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)],
    "wide-tree": [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0), (0, 1, 0),
                  (0, 0, 0, 0), (0, 0, 0, 0, 0)],
}


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5])
def test_greedy_chain_equals_plain(tiny_target, tiny_draft, prompts, num_heads):
    decoder = SpeculativeDecoder(tiny_target, ChimeraDrafter(tiny_draft), TokenTree.chain(num_heads))
    for prompt in prompts:
        for max_new_tokens in (1, 7, 40):
            plain = generate_plain(tiny_target, prompt, max_new_tokens)
            spec = decoder.generate(prompt, max_new_tokens)
            assert spec.token_ids == plain.token_ids


@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_greedy_tree_equals_plain(tiny_target, tiny_draft, prompts, tree_name):
    decoder = SpeculativeDecoder(tiny_target, ChimeraDrafter(tiny_draft), TokenTree.from_paths(TREES[tree_name]))
    for prompt in prompts:
        plain = generate_plain(tiny_target, prompt, 40)
        assert decoder.generate(prompt, 40).token_ids == plain.token_ids


@pytest.mark.parametrize("tree", [TokenTree.chain(4), TokenTree.from_paths(TREES["small-tree"])],
                         ids=["chain", "tree"])
def test_oracle_draft_is_always_accepted(tiny_target, prompts, tree):
    oracle = TargetOracleDrafter(tiny_target, num_heads=tree.max_depth)
    decoder = SpeculativeDecoder(tiny_target, oracle, tree)
    for prompt in prompts:
        spec = decoder.generate(prompt, 31)
        assert spec.token_ids == generate_plain(tiny_target, prompt, 31).token_ids
        # Every step accepts the deepest path (max_depth drafts) plus the bonus token.
        assert spec.accept_lengths == [tree.max_depth + 1] * len(spec.accept_lengths)
        assert len(spec.accept_lengths) == 6  # 1 token from prefill + 6 steps x 5 tokens


def test_random_draft_is_mostly_rejected_yet_exact(tiny_target, tiny_draft, prompts):
    decoder = SpeculativeDecoder(tiny_target, ChimeraDrafter(tiny_draft), TokenTree.chain(5))
    spec = decoder.generate(prompts[2], 40)
    assert spec.mean_accept_length < 2.0  # mostly rejected: the reject path really runs


def test_eos_stops_generation(tiny_target, tiny_draft, prompts):
    plain = generate_plain(tiny_target, prompts[1], 30)
    eos = plain.token_ids[10]
    expected = plain.token_ids[: plain.token_ids.index(eos) + 1]
    for drafter in (ChimeraDrafter(tiny_draft), TargetOracleDrafter(tiny_target, 4)):
        spec = SpeculativeDecoder(tiny_target, drafter, TokenTree.chain(4)).generate(
            prompts[1], 30, eos_token_id=eos)
        assert spec.token_ids == expected


# -- sampling: the distribution of the output equals the target's ------------------------

VOCAB = 12


@pytest.fixture(scope="module")
def small_vocab_target(tmp_path_factory):
    # A small init range keeps the distributions broad, so a random draft is often accepted.
    return build_tiny_target(tmp_path_factory.mktemp("small_vocab"), vocab_size=VOCAB,
                             hidden_size=32, initializer_range=0.15, seed=3)


def _exact_joint(target, prompt, length):
    """P(x_1 .. x_length | prompt) for every sequence, by enumeration: [V] * length."""
    joint = torch.ones(1)
    seqs = prompt[None]
    for _ in range(length):
        with torch.no_grad():
            probs = torch.softmax(target(input_ids=seqs).logits[:, -1], dim=-1)  # [num_seqs, V]
        joint = (joint[:, None] * probs).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(VOCAB, 0),
                          torch.arange(VOCAB).repeat(seqs.shape[0])[:, None]], dim=1)
    return joint.view([VOCAB] * length)


@pytest.mark.parametrize("paths", [[(0,), (0, 0)], [(0,), (1,), (0, 0), (1, 0)]], ids=["chain", "tree"])
def test_sampling_matches_the_target_distribution(small_vocab_target, paths):
    """Joint distribution of the first 3 new tokens (the 2nd and 3rd pass through the
    draft and the acceptance rule) against the exact target distribution.

    3000 samples over 12^3 cells is too sparse for the joint, so the test compares the
    joint of (x1, x2) (144 cells, expected TV ~0.08 from sampling noise alone) with
    tolerance 0.13, and the marginal of x3 (12 cells, expected TV ~0.02) with tolerance
    0.05. Accepting every draft token instead gives TV > 0.3 on this pair of models.
    """
    target = small_vocab_target
    draft = build_random_draft(target, num_heads=2, seed=5)
    decoder = SpeculativeDecoder(target, ChimeraDrafter(draft), TokenTree.from_paths(paths))
    prompt = torch.tensor([1, 4, 7])
    exact = _exact_joint(target, prompt, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB)
    accepted = 0
    num_samples = 3000
    for _ in range(num_samples):
        out = decoder.generate(prompt, 3, temperature=1.0, generator=g)
        counts[tuple(out.token_ids)] += 1
        accepted += out.accept_lengths[0] - 1
    print(f"accepted {accepted}, ", end="")
    empirical = counts / num_samples
    tv_pair = 0.5 * (empirical.sum(2) - exact.sum(2)).abs().sum()
    tv_third = 0.5 * (empirical.sum((0, 1)) - exact.sum((0, 1))).abs().sum()
    print(f"TV pair {tv_pair:.3f} TV third {tv_third:.3f}")
    assert accepted > 0.1 * num_samples, "draft never accepted: the test would not see the accept path"
    assert tv_pair < 0.13, f"TV(x1, x2) = {tv_pair:.3f}"
    assert tv_third < 0.05, f"TV(x3) = {tv_third:.3f}"
