"""Unit tests of the acceptance rules on hand-made target distributions."""
import pytest
import torch

from vllm_chimera.tree import TokenTree
from vllm_chimera.verify import accept_greedy, accept_sampling

VOCAB = 6


def one_hot_logits(token_per_node):
    return torch.nn.functional.one_hot(torch.tensor(token_per_node), VOCAB).float() * 5


def test_greedy_chain_accepts_matching_prefix():
    tree = TokenTree.chain(3)
    node_tokens = torch.tensor([0, 1, 2, 3])  # root, drafts 1 2 3
    # target argmax after each node: 1 (matches), 2 (matches), 5 (draft 3 rejected), 4
    acc = accept_greedy(tree, node_tokens, one_hot_logits([1, 2, 5, 4]))
    assert acc.nodes == [0, 1, 2] and acc.bonus_token == 5
    acc = accept_greedy(tree, node_tokens, one_hot_logits([4, 2, 3, 4]))
    assert acc.nodes == [0] and acc.bonus_token == 4
    acc = accept_greedy(tree, node_tokens, one_hot_logits([1, 2, 3, 0]))
    assert acc.nodes == [0, 1, 2, 3] and acc.bonus_token == 0


def test_greedy_tree_takes_the_agreeing_branch():
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (1, 0)])  # nodes: r, a, b, a0, b0
    node_tokens = torch.tensor([0, 1, 2, 3, 3])
    # the target wants 2 after the root (branch b), then 3, then 4
    acc = accept_greedy(tree, node_tokens, one_hot_logits([2, 3, 3, 5, 4]))
    assert acc.nodes == [0, 2, 4] and acc.bonus_token == 4


@pytest.mark.parametrize("paths", [[(0,), (0, 0), (0, 0, 0)],
                                   [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]])
def test_sampling_with_one_hot_target_is_greedy(paths):
    tree = TokenTree.from_paths(paths)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        # Siblings are distinct tokens (a head's top-k), as in every real tree.
        head_top_k = torch.stack([torch.randperm(3, generator=g) for _ in range(tree.max_depth)])
        node_tokens = tree.candidate_tokens(torch.tensor(5), head_top_k)
        logits = torch.randn(tree.num_nodes, VOCAB, generator=g)
        logits[:, :3] += 2  # make agreement likely enough to accept something
        probs = torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float()
        greedy = accept_greedy(tree, node_tokens, logits)
        sampled = accept_sampling(tree, node_tokens, probs, g)
        assert (greedy.nodes, greedy.bonus_token) == (sampled.nodes, sampled.bonus_token)


def _first_token_distribution(tree, node_tokens, probs, num_samples, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(num_samples):
        acc = accept_sampling(tree, node_tokens, probs, g)
        first = int(node_tokens[acc.nodes[1]]) if len(acc.nodes) > 1 else acc.bonus_token
        counts[first] += 1
    return counts / num_samples


@pytest.mark.parametrize("paths", [[(0,)], [(0,), (1,), (2,)]])
def test_sampling_first_token_has_target_distribution(paths):
    """Whatever the draft proposes, the first new token is distributed as the target's p.

    4000 samples over 6 tokens: the expected total-variation distance of the empirical
    distribution is about 0.02; 0.05 is the tolerance. Accepting every draft instead (a
    broken rule) gives a TV distance of about 0.5 here.
    """
    tree = TokenTree.from_paths(paths)
    p = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.25, 0.25])
    probs = p.expand(tree.num_nodes, VOCAB).clone()
    node_tokens = torch.tensor([0] + [0, 1, 2][: tree.num_nodes - 1])  # drafts of unlikely tokens
    empirical = _first_token_distribution(tree, node_tokens, probs, 4000, seed=0)
    assert 0.5 * (empirical - p).abs().sum() < 0.05
