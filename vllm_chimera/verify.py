"""Lossless acceptance rules for a verified token tree (a chain is a one-path tree).

Both rules take the tree, the token of every node, and the target's output at every node
(the target's prediction for the token AFTER that node), and return the accepted nodes
(root first) plus one bonus token sampled/chosen by the target after the last accepted
node. The step therefore always yields len(accepted) >= 1 new tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_chimera.tree import TokenTree


@dataclass
class Acceptance:
    nodes: list[int]  # accepted node ids, root (0) first
    bonus_token: int  # the target's token after the last accepted node

    @property
    def num_accepted_drafts(self) -> int:
        return len(self.nodes) - 1


def accept_greedy(tree: TokenTree, node_tokens: torch.Tensor,
                  target_logits: torch.Tensor) -> Acceptance:
    """Greedy: the longest root-to-leaf path whose every token is the target's argmax.

    node_tokens: [num_nodes]; target_logits: [num_nodes, vocab].
    Worked example (chain of 3, root r): node tokens [r, a, b, c], target argmax per node
    [a, b, x, y] -> a and b accepted (c != x), bonus = argmax at b's node = x.
    """
    argmax = target_logits.argmax(dim=-1)  # [num_nodes]
    paths = tree.retrieve_indices.to(node_tokens.device)  # [num_leaves, max_depth + 1]
    valid = paths[:, 1:] >= 0
    child, parent = paths[:, 1:].clamp(min=0), paths[:, :-1].clamp(min=0)
    match = (node_tokens[child] == argmax[parent]) & valid  # [num_leaves, max_depth]
    num_accepted = match.int().cumprod(dim=1).sum(dim=1)  # [num_leaves]
    best = int(num_accepted.argmax())  # the first longest path
    nodes = paths[best, : int(num_accepted[best]) + 1].tolist()
    return Acceptance(nodes, int(argmax[nodes[-1]]))


def accept_sampling(tree: TokenTree, node_tokens: torch.Tensor, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> Acceptance:
    """Multi-candidate rejection sampling for a deterministic (top-k) draft.

    target_probs: [num_nodes, vocab], the target's (temperature-scaled) distribution at
    every node. At a node with residual distribution r, the children are tried best rank
    first; child token t is accepted with probability r(t) (the draft's q is one-hot, so
    min(1, r(t) / q(t)) = r(t)); on rejection r(t) is set to 0 and r renormalised
    (r <- norm(max(r - q, 0))). If no child is accepted the bonus token is drawn from r.
    Each step's output token is therefore distributed exactly as the target's: with
    children t1, t2: P(t1) = p(t1), P(t2) = (1 - p(t1)) * p(t2) / (1 - p(t1)) = p(t2),
    and any other token keeps its share of p. A chain is the one-child case: standard
    speculative rejection sampling.
    """
    node, nodes = 0, [0]
    while True:
        residual = target_probs[node].float().clone()
        for child in tree.children[node]:
            token = int(node_tokens[child])
            u = torch.rand((), generator=generator, device=residual.device)
            if u < residual[token]:
                node = child
                break
            residual[token] = 0.0
            residual /= residual.sum()
        else:  # every child rejected, or a leaf: the target's own token ends the step
            bonus = torch.multinomial(residual, 1, generator=generator)
            return Acceptance(nodes, int(bonus))
        nodes.append(node)
