"""Static token trees for tree verification: the one implementation of the tree buffers.

A tree is given Medusa-style as a list of paths. A path is a tuple of top-k ranks, one
per depth: (0, 1) is "head 0's best token, then head 1's second-best token". All heads of
a Chimera step read the same (h_n, s_n), so the candidates at depth i+1 are head i's top-k
whatever the parent: a node's token depends only on its depth and its last rank.

Worked example, paths [(0,), (1,), (0, 0)]:

    node 0  root       the token the target just produced (x_{n+1})
    node 1  (0,)       head 0, rank 0   -> parent 0, depth 1
    node 2  (1,)       head 0, rank 1   -> parent 0, depth 1
    node 3  (0, 0)     head 1, rank 0   -> parent 1, depth 2

    parents          = [-1, 0, 0, 1]
    depths           = [0, 1, 1, 2]          position offsets after the root
    token_index      = [0, 1, 2, 1 + top_k]  into [root, head0 top-k..., head1 top-k...]
    retrieve_indices = [[0, 1, 3],           one row per leaf, root first, -1 padded
                        [0, 2, -1]]
A chain of K tokens is the tree [(0,), (0, 0), ..., (0,) * K].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from chimera_kernels import tree_attention_mask

Path = tuple[int, ...]


@dataclass(frozen=True)
class TokenTree:
    paths: tuple[Path, ...]  # sorted by (depth, ranks); node i+1 is paths[i]
    parents: torch.Tensor = field(repr=False)  # [num_nodes] int64, root's is -1
    depths: torch.Tensor = field(repr=False)  # [num_nodes] int64
    token_index: torch.Tensor = field(repr=False)  # [num_nodes] int64
    retrieve_indices: torch.Tensor = field(repr=False)  # [num_leaves, max_depth + 1] int64
    top_k: int  # the most candidates any head must supply

    @classmethod
    def from_paths(cls, paths) -> "TokenTree":
        paths = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        if not paths:
            raise ValueError("a token tree needs at least one path")
        node_of = {(): 0}
        for i, path in enumerate(paths):
            if len(path) == 0 or min(path) < 0:
                raise ValueError(f"tree path {path} must be a non-empty tuple of ranks >= 0")
            if path[:-1] not in node_of:
                raise ValueError(f"tree path {path} has no parent path {path[:-1]} in the tree")
            node_of[path] = i + 1
        top_k = max(max(p) for p in paths) + 1
        parents = [-1] + [node_of[p[:-1]] for p in paths]
        depths = [0] + [len(p) for p in paths]
        token_index = [0] + [1 + (len(p) - 1) * top_k + p[-1] for p in paths]
        leaves = [p for p in paths if not any(q[:-1] == p for q in paths)]
        max_depth = max(depths)
        retrieve = [[0] + [node_of[leaf[:d]] for d in range(1, len(leaf) + 1)]
                    + [-1] * (max_depth - len(leaf)) for leaf in leaves]
        as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return cls(tuple(paths), as_long(parents), as_long(depths), as_long(token_index),
                   as_long(retrieve), top_k)

    @classmethod
    def chain(cls, num_tokens: int) -> "TokenTree":
        if num_tokens < 1:
            raise ValueError(f"a chain needs at least 1 draft token, got {num_tokens}")
        return cls.from_paths([(0,) * k for k in range(1, num_tokens + 1)])

    def truncated(self, num_nodes: int) -> "TokenTree":
        """The tree of this tree's first `num_nodes` nodes (a prefix of the node order is a
        tree: every parent comes before its children). vLLM's scheduler may cut a request's
        drafts short (token budget, max_model_len); what it keeps is this tree."""
        if not 2 <= num_nodes <= self.num_nodes:
            raise ValueError(f"a truncated tree keeps 2..{self.num_nodes} nodes, got {num_nodes}")
        return self if num_nodes == self.num_nodes else TokenTree.from_paths(self.paths[: num_nodes - 1])

    def expected_num_tokens(self, accuracies) -> float:
        """Expected tokens per step (accepted drafts + the bonus token) under greedy acceptance.

        accuracies[i][r]: the probability that head i's rank-r candidate is the target's
        token, given that the path before it was accepted (measured, see `best_tree`).
        Siblings are exclusive (at most one candidate per head is the target's token), so
        a node is reached with the product of its path's accuracies and the expectation is
        1 + the sum over nodes. e.g. paths [(0,), (1,), (0, 0)], accuracies
        [[0.5, 0.2], [0.4]]: 1 + 0.5 + 0.2 + 0.5 * 0.4 = 1.9.
        """
        return 1.0 + sum(_path_probability(path, accuracies) for path in self.paths)

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        """The number of decoding heads the tree uses."""
        return int(self.depths.max())

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """children[i]: node ids whose parent is i, best rank first (the sampling order)."""
        kids = [[] for _ in range(self.num_nodes)]
        for node in range(1, self.num_nodes):  # paths are sorted, so ranks come in order
            kids[int(self.parents[node])].append(node)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        """[num_nodes, num_nodes] bool: node i sees node j iff j is i or an ancestor of i."""
        return tree_attention_mask(self.parents, torch.zeros(1, dtype=torch.long))[0]

    def candidate_tokens(self, root_token: torch.Tensor, head_top_k: torch.Tensor) -> torch.Tensor:
        """The token of every node, for one request or a batch of them.

        root_token: [*batch] the token the target just produced; head_top_k:
        [*batch, num_heads, >= top_k] target ids per head, best first. Returns [*batch, num_nodes].
        """
        if head_top_k.shape[-2] < self.max_depth or head_top_k.shape[-1] < self.top_k:
            raise ValueError(f"tree needs {self.max_depth} heads x top-{self.top_k}, "
                             f"got candidates of shape {tuple(head_top_k.shape)}")
        flat = torch.cat([root_token.unsqueeze(-1),  # [*batch, 1 + max_depth * top_k]
                          head_top_k[..., : self.max_depth, : self.top_k].flatten(-2)], dim=-1)
        return flat[..., self.token_index.to(flat.device)]


def _path_probability(path: Path, accuracies) -> float:
    probability = 1.0
    for depth, rank in enumerate(path):
        head = accuracies[depth] if depth < len(accuracies) else ()
        probability *= head[rank] if rank < len(head) else 0.0
    return probability


def best_paths(accuracies, max_nodes: int) -> list[Path]:
    """The paths of the most likely `max_nodes`-node tree, best node first.

    Greedy (as Medusa's and Sequoia's tree searches): start from the root and repeatedly
    add the child, of any node already in the tree, that is most likely to be reached
    (_path_probability). Every prefix of the result is itself such a tree, so
    best_paths(a, m)[: n - 1] is the best n-node tree for every n <= m.
    """
    if max_nodes < 2:
        raise ValueError(f"a tree needs at least 2 nodes (the root and one draft), got {max_nodes}")
    chosen: list[Path] = []
    frontier = {(rank,) for rank in range(len(accuracies[0]))} if accuracies else set()
    while frontier and len(chosen) < max_nodes - 1:
        path = max(frontier, key=lambda p: (_path_probability(p, accuracies), [-r for r in p]))
        frontier.remove(path)
        chosen.append(path)
        if len(path) < len(accuracies):
            frontier |= {path + (rank,) for rank in range(len(accuracies[len(path)]))}
    return chosen


def best_tree(accuracies, step_seconds) -> TokenTree:
    """The tree that maximises expected tokens per second.

    accuracies: [num_heads][top_k] as in TokenTree.expected_num_tokens.
    step_seconds: {num_tokens: seconds} the measured time of one decoding step that
        verifies num_tokens tokens (the root and num_tokens - 1 nodes); sizes between
        measured ones are interpolated linearly, none beyond the largest is considered.
    e.g. accuracies [[0.3, 0.1, 0.05], [0.1]] and step times {1: 30 ms, 2: 31, 3: 32,
    5: 45}: 2 nodes give 1.3 tokens / 31 ms = 41.9/s, 3 nodes 1.4 / 32 = 43.8/s,
    4 nodes 1.45 / 38.5 = 37.7/s: the 3-node tree [(0,), (1,)] wins.
    """
    sizes = sorted(int(n) for n in step_seconds)
    if not sizes or sizes[0] < 1:
        raise ValueError(f"step_seconds needs measured sizes >= 1, got {sorted(step_seconds)}")
    paths = best_paths(accuracies, sizes[-1])
    best, best_rate = None, 0.0
    for num_nodes in range(2, len(paths) + 2):
        tree = TokenTree.from_paths(paths[: num_nodes - 1])
        rate = tree.expected_num_tokens(accuracies) / _interpolate(step_seconds, sizes, num_nodes)
        if rate > best_rate:
            best, best_rate = tree, rate
    if best is None:
        raise ValueError("no tree fits the measured step times")
    return best


def _interpolate(step_seconds, sizes: list[int], num_tokens: int) -> float:
    if num_tokens in step_seconds:
        return float(step_seconds[num_tokens])
    upper = next(n for n in sizes if n > num_tokens)
    lower = max(n for n in sizes if n < num_tokens)
    weight = (num_tokens - lower) / (upper - lower)
    return (1 - weight) * float(step_seconds[lower]) + weight * float(step_seconds[upper])


def spine_paths(num_heads: int, top_k: int) -> list[Path]:
    """The tree that measures every head's top-k: the top-1 chain, with all top_k ranks
    as children of each chain node. e.g. 2 heads, top-2: [(0,), (1,), (0, 0), (0, 1)]."""
    return [(0,) * depth + (rank,) for depth in range(num_heads) for rank in range(top_k)]


def spine_accuracies(num_accepted_per_path, num_trees: int, num_heads: int,
                     top_k: int) -> list[list[float]]:
    """[num_heads][top_k] accuracies (as best_paths takes them) from verifying
    spine_paths(num_heads, top_k) trees: how often head i's rank-r candidate was accepted
    when the chain before it, (0,) * i, was.

    e.g. 100 trees, (0,) accepted 30 times and (1,) 10 times, (0, 0) 6 times and (0, 1)
    3 times: [[0.3, 0.1], [0.2, 0.1]]. A head whose parent was never reached gets zeros.
    """
    accuracies = []
    for depth in range(num_heads):
        reached = num_trees if depth == 0 else num_accepted_per_path.get((0,) * depth, 0)
        accuracies.append([num_accepted_per_path.get((0,) * depth + (rank,), 0) / reached
                           if reached else 0.0 for rank in range(top_k)])
    return accuracies
