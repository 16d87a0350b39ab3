import pytest
import torch

from vllm_chimera.tree import TokenTree, best_paths, best_tree, spine_accuracies, spine_paths


def test_worked_example_buffers():
    tree = TokenTree.from_paths([(1,), (0, 0), (0,)])  # order does not matter
    assert tree.paths == ((0,), (1,), (0, 0))
    assert tree.parents.tolist() == [-1, 0, 0, 1]
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert tree.top_k == 2
    assert tree.token_index.tolist() == [0, 1, 2, 1 + 2 + 0]
    assert tree.retrieve_indices.tolist() == [[0, 2, -1], [0, 1, 3]]
    assert tree.children == ((1, 2), (3,), (), ())
    assert tree.attention_mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]


def test_candidate_tokens_pick_head_top_k():
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    head_top_k = torch.tensor([[10, 11], [20, 21], [30, 31]])  # 3 heads, top-2 each
    tokens = tree.candidate_tokens(torch.tensor(7), head_top_k)
    # nodes: root, (0,), (1,), (0,0), (0,1), (1,0)
    assert tokens.tolist() == [7, 10, 11, 20, 21, 20]


def test_chain_is_a_causal_one_path_tree():
    tree = TokenTree.chain(4)
    assert tree.num_nodes == 5 and tree.max_depth == 4 and tree.top_k == 1
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3]
    assert tree.retrieve_indices.tolist() == [[0, 1, 2, 3, 4]]
    assert torch.equal(tree.attention_mask, torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("paths, message", [
    ([], "at least one path"),
    ([(0, 0)], "no parent path"),
    ([(0,), (-1,)], "ranks >= 0"),
])
def test_invalid_trees_are_refused(paths, message):
    with pytest.raises(ValueError, match=message):
        TokenTree.from_paths(paths)


def test_candidates_must_cover_the_tree():
    tree = TokenTree.from_paths([(0,), (2,)])
    with pytest.raises(ValueError, match="top-3"):
        tree.candidate_tokens(torch.tensor(0), torch.zeros(1, 2, dtype=torch.long))


def test_expected_num_tokens_and_truncation():
    tree = TokenTree.from_paths([(0,), (1,), (0, 0)])
    assert tree.expected_num_tokens([[0.5, 0.2], [0.4]]) == pytest.approx(1.9)  # 1 + .5 + .2 + .5 * .4
    assert TokenTree.chain(2).expected_num_tokens([[0.5], [0.5]]) == pytest.approx(1.75)
    assert tree.truncated(3).paths == ((0,), (1,))


def test_best_paths_is_greedy_and_prefix_closed():
    accuracies = [[0.5, 0.2], [0.4, 0.1]]
    # (0,) .5; then (0, 0) .2 ties (1,) .2 (the lower ranks win ties); then (1,)
    assert best_paths(accuracies, 4) == [(0,), (0, 0), (1,)]
    paths = best_paths(accuracies, 7)
    assert paths[:3] == best_paths(accuracies, 4)
    for n in range(1, len(paths) + 1):
        TokenTree.from_paths(paths[:n])  # every prefix is a tree (no missing parent)
    with pytest.raises(ValueError, match="at least 2 nodes"):
        best_paths(accuracies, 1)


def test_best_tree_maximises_tokens_per_second():
    # The docstring's example: 3 nodes give 1.4 tokens / 32 ms, the most per second.
    tree = best_tree([[0.3, 0.1, 0.05], [0.1]], {1: 0.030, 2: 0.031, 3: 0.032, 5: 0.045})
    assert tree.paths == ((0,), (1,))
    # Free verification makes the biggest measured tree the best.
    assert best_tree([[0.3, 0.1, 0.05], [0.1]], {1: 0.03, 5: 0.03}).num_nodes == 5


def test_spine_accuracies_worked_example():
    assert spine_paths(2, 2) == [(0,), (1,), (0, 0), (0, 1)]
    counts = {(0,): 30, (1,): 10, (0, 0): 6, (0, 1): 3}
    assert spine_accuracies(counts, 100, 2, 2) == [[0.3, 0.1], [0.2, 0.1]]
    assert spine_accuracies({}, 0, 2, 1) == [[0.0], [0.0]]
