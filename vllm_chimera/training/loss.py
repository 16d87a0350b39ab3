"""The self-distillation loss of the K heads, as a module (so DistributedDataParallel can wrap it).

Head i at position t predicts x_{t+2+i}; its label is the TARGET's greedy prediction of that
token given the sequence, i.e. the target's argmax at position t+1+i (cached as greedy[t+1+i]),
masked where t+2+i is beyond the sequence (or, with loss_on="responses", not an assistant token).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_chimera.model import ChimeraDraftModel

IGNORE = -100


def head_labels(greedy: torch.Tensor, loss_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Labels for the heads at positions t = 0 .. L-2 (those with an x_{t+1} to encode).

    greedy, loss_mask: [B, L] -> labels [K, B, L-1] (target ids, IGNORE where masked).
    labels[i, b, t] = greedy[b, t+1+i] where loss_mask[b, t+2+i], else IGNORE.
    """
    B, L = greedy.shape
    labels = torch.full((num_heads, B, L - 1), IGNORE, dtype=torch.long, device=greedy.device)
    for i in range(num_heads):
        n = L - 2 - i  # positions t with t+2+i <= L-1
        if n <= 0:
            break
        labels[i, :, :n] = torch.where(loss_mask[:, 2 + i:], greedy[:, 1 + i:L - 1], IGNORE)
    return labels


class DraftLoss(nn.Module):
    """forward(batch) -> (weighted loss, per-head [loss_sum, correct, count] stats [K, 3])."""

    def __init__(self, draft: ChimeraDraftModel, head_weights: list[float], loss_on: str = "responses"):
        super().__init__()
        self.draft = draft
        self.register_buffer("head_weights", torch.tensor(head_weights, dtype=torch.float32),
                             persistent=False)
        self.loss_on = loss_on
        self.target_to_draft = None  # [V] draft id of each target id (-1: none), reduced vocab only
        if draft.config.draft_vocab_size is not None:
            inverse = torch.full((draft.config.vocab_size,), -1, dtype=torch.long)
            inverse[draft.draft_to_target_ids.cpu()] = torch.arange(draft.config.draft_vocab_size)
            self.target_to_draft = inverse

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, hidden, greedy = batch["tokens"], batch["hidden"], batch["greedy"]  # [B, L], [B, L, d], [B, L]
        B, L = tokens.shape
        real = torch.arange(L, device=tokens.device)[None] < batch["lengths"][:, None]  # [B, L]
        loss_mask = batch["mask"] & real if self.loss_on == "responses" else real
        K = self.draft.config.num_decoding_heads
        labels = head_labels(greedy, loss_mask, K)  # [K, B, L-1]
        positions = torch.arange(L - 1, device=tokens.device).expand(B, L - 1)
        # Chunks start at t = 0: the trigram encoder repeats x_0 before the start.
        prefix = torch.stack([torch.full_like(tokens[:, 0], -1), tokens[:, 0]], dim=1)  # [B, 2]
        h = hidden[:, :-1]  # [B, L-1, d]: h_t for t = 0 .. L-2
        s = self.draft.encode(tokens[:, 1:], h, positions, prefix)  # [B, L-1, d]
        # The LM-head projections dominate the cost: run the heads only where some head has a label.
        selected = (labels != IGNORE).any(0)  # [B, L-1]
        logits = self.draft.head_logits(h[selected], s[selected]).float()  # [K, P, V or V_draft]
        labels = labels[:, selected]  # [K, P]
        return self._loss_and_stats(logits, labels)

    def _loss_and_stats(self, logits: torch.Tensor, labels: torch.Tensor):
        """logits [K, P, V'], labels [K, P] target ids -> (loss, stats [K, 3])."""
        valid = labels != IGNORE  # [K, P]
        train_labels = labels
        if self.target_to_draft is not None:  # labels outside the draft vocabulary teach nothing
            mapped = self.target_to_draft.to(labels.device)[labels.clamp(min=0)]
            train_labels = torch.where(valid & (mapped >= 0), mapped, IGNORE)
        per_token = F.cross_entropy(logits.flatten(0, 1), train_labels.flatten(),
                                    ignore_index=IGNORE, reduction="none").view(labels.shape)
        loss_sums = per_token.sum(-1)  # [K]
        counts = valid.sum(-1)  # [K]
        # Mean over each head's labelled tokens (a head with none contributes 0, not NaN).
        loss = (self.head_weights.to(logits.device) * loss_sums / counts.clamp(min=1)).sum()
        with torch.no_grad():
            predictions = self.draft.to_target_ids(logits.argmax(-1))  # [K, P] target ids
            hits = (predictions == labels) & valid  # [K, P]
            # Kept for validation's acceptance-length estimate (needs per-position hits).
            self.last_hits, self.last_valid = hits, valid
            correct = hits.sum(-1)
            stats = torch.stack([loss_sums.detach(), correct.float(), counts.float()], dim=-1)
        return loss, stats
