import pytest
import torch

from vllm_chimera.tree import TokenTree


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
