"""The self-distillation losses of parallel heads, as modules (so DistributedDataParallel can wrap them).

Head i at position t predicts x_{t+2+i}; its label is the TARGET's greedy prediction of that
token given the sequence, i.e. the target's argmax at position t+1+i (cached as greedy[t+1+i]),
masked where t+2+i is beyond the sequence (or, with loss_on="responses", not an assistant token).

`HeadsLoss` is the loss of any set of K parallel heads (Chimera's here, Medusa's in peers.py);
`DraftLoss` is Chimera's.

Cheaper steps (`positions_fraction`): the heads' LM-head projections are most of a step, and
neighbouring positions of one answer teach nearly the same thing, so a training step may take
the loss on a random subset of each sequence's labelled positions (the encoders still run over
every position: the context layer needs the whole prefix). The subset is drawn from
`batch["position_seeds"]` (one seed per sequence, a pure function of the run's seed, the step
and the sequence: `position_seeds`), so a resumed run draws exactly the subsets an
uninterrupted one would, whatever the micro-batching or the number of processes. Validation
(eval mode) always scores every position.

Where the lookup drafts (`skip_lookup_matches`): inside vLLM the context lookup drafts
wherever the context's last min_match tokens occurred before, and the heads only elsewhere
(vllm_chimera/context_lookup.py); with it set, training takes no loss at the lookup's positions.

Distillation beyond the argmax label (both off by default; the cached h_{t+1+i} gives both for
free, as the frozen target's LM head reads it):
- kl_weight: KL(p || q_i) from the target's full next-token distribution
  p = softmax(LMHead(h_{t+1+i})) (over the draft vocabulary when it is reduced) to head i's
  (Medusa-2's self-distillation);
- regression_weight: smooth-L1 of what head i feeds its LM head (h_t + R_i(...) for Chimera)
  onto h_{t+1+i} (EAGLE's feature regression).
Both are zero for a draft that reproduces the target's next hidden states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_chimera.context_lookup import lookup_matches
from vllm_chimera.model import ChimeraDraftModel, to_target_ids

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


def position_seeds(seed: int, step: int, sequence_indices: list[int]) -> torch.Tensor:
    """One seed per sequence [B] (int64) for `subsample_positions` at optimizer step `step`:
    different each step and each sequence, the same on every rerun."""
    return torch.tensor([(seed * 1_000_003 + step) * 10_000_019 + i for i in sequence_indices],
                        dtype=torch.long)


def subsample_positions(selected: torch.Tensor, fraction: float, seeds: torch.Tensor) -> torch.Tensor:
    """A random subset of each row's selected positions: round(fraction * n) of its n (at
    least 1 where n > 0), uniformly without replacement, drawn from the row's seed.

    selected [B, T] bool, seeds [B] int64 -> [B, T] bool, a subset of `selected`.
    """
    B, T = selected.shape
    # One uniform key per position from each row's own generator (on the CPU: a CUDA batch
    # would otherwise draw from a different stream); the row's k smallest keys are kept.
    keys = torch.stack([torch.rand(T, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds.tolist()]).to(selected.device)  # [B, T]
    keys = keys.masked_fill(~selected, 2.0)  # unselected positions sort last
    counts = selected.sum(-1)  # [B]
    keep = torch.where(counts > 0, (counts.double() * fraction).round().long().clamp(min=1), 0)  # [B]
    rank = keys.argsort(-1).argsort(-1)  # [B, T]: each position's rank within its row
    return selected & (rank < keep[:, None])


def batch_labels(batch: dict[str, torch.Tensor], loss_on: str, num_heads: int) -> torch.Tensor:
    """head_labels of a CachedData batch: [K, B, L-1], padding and (with loss_on="responses")
    non-response tokens masked."""
    tokens = batch["tokens"]  # [B, L]
    real = torch.arange(tokens.shape[1], device=tokens.device)[None] < batch["lengths"][:, None]  # [B, L]
    loss_mask = batch["mask"] & real if loss_on == "responses" else real
    return head_labels(batch["greedy"], loss_mask, num_heads)


class HeadsLoss(nn.Module):
    """forward(batch) -> (weighted loss, per-head stats [K, 5]:
    [CE sum, correct, count, KL sum, regression sum]).

    Subclasses give `head_states`, `project` and `target_lm_head`, and with a reduced draft
    vocabulary `draft_vocabulary`; the labels, the weighting and the statistics are shared.
    With a reduced vocabulary, labels outside it teach CE nothing, and the statistics compare
    target ids.
    """

    def __init__(self, draft: nn.Module, head_weights: list[float], loss_on: str = "responses",
                 positions_fraction: float | None = None, kl_weight: float = 0.0,
                 regression_weight: float = 0.0, skip_lookup_matches: int | None = None):
        super().__init__()
        self.draft = draft
        self.num_heads = len(head_weights)
        self.register_buffer("head_weights", torch.tensor(head_weights, dtype=torch.float32),
                             persistent=False)
        self.loss_on = loss_on
        # In training, the share of each sequence's labelled positions the heads are run on
        # (None: all of them); needs batch["position_seeds"] (module docstring).
        self.positions_fraction = positions_fraction
        # In training, the lookup's min_match: no loss where the lookup drafts (None: off).
        self.skip_lookup_matches = skip_lookup_matches
        self.kl_weight, self.regression_weight = kl_weight, regression_weight
        self.target_to_draft = None  # [V] draft id of each target id (-1: none), reduced vocab only
        vocabulary = self.draft_vocabulary()
        if vocabulary is not None:
            draft_to_target, vocab_size = vocabulary
            inverse = torch.full((vocab_size,), -1, dtype=torch.long)
            inverse[draft_to_target.cpu()] = torch.arange(len(draft_to_target))
            self.target_to_draft = inverse

    def draft_vocabulary(self) -> tuple[torch.Tensor, int] | None:
        """(draft_to_target_ids [V'], the target's vocabulary size V) when the logits span a
        reduced draft vocabulary (logit j is target token draft_to_target_ids[j]), else None."""
        return None

    def head_states(self, tokens: torch.Tensor, hidden: torch.Tensor, selected: torch.Tensor,
                    greedy: torch.Tensor) -> torch.Tensor:
        """tokens, greedy [B, L], hidden [B, L, d], selected [B, L-1] -> what each head feeds
        its LM head at the selected positions t (P of them): [K, P, d]."""
        raise NotImplementedError

    def draft_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The hidden states the draft reads, [B, L, d]: the target's h_t (the labels and
        the regression targets always read the target's own)."""
        return batch["hidden"]

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """The heads' LM heads: states [K, P, d] -> logits [K, P, V']."""
        raise NotImplementedError

    def target_lm_head(self) -> torch.Tensor:
        """The frozen target's LM head weight [V, d] (for kl_weight)."""
        raise NotImplementedError

    def head_logits(self, tokens: torch.Tensor, hidden: torch.Tensor, selected: torch.Tensor,
                    greedy: torch.Tensor) -> torch.Tensor:
        """tokens, greedy [B, L], hidden [B, L, d], selected [B, L-1] -> logits [K, P, V']."""
        return self.project(self.head_states(tokens, hidden, selected, greedy))

    def train_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Target ids [K, P] -> the ids the logits index (a reduced vocabulary maps them)."""
        if self.target_to_draft is None:
            return labels
        # Labels outside the draft vocabulary teach nothing.
        mapped = self.target_to_draft.to(labels.device)[labels.clamp(min=0)]
        return torch.where((labels != IGNORE) & (mapped >= 0), mapped, IGNORE)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch_labels(batch, self.loss_on, self.num_heads)  # [K, B, L-1]
        # The LM-head projections dominate the cost: run the heads only where some head has a label.
        selected = (labels != IGNORE).any(0)  # [B, L-1]
        if self.training and self.skip_lookup_matches is not None:
            selected = selected & ~lookup_matches(batch["tokens"], batch["lengths"],
                                                  self.skip_lookup_matches)  # [B, L-1]
        if self.training and self.positions_fraction is not None:
            selected = subsample_positions(selected, self.positions_fraction,
                                           batch["position_seeds"])  # [B, L-1]
        self.last_selected = selected  # validation splits its figures by position
        states = self.head_states(batch["tokens"], self.draft_inputs(batch), selected,
                                  batch["greedy"])  # [K, P, d]
        logits = self.project(states).float()  # [K, P, V']
        next_hidden = None
        if self.kl_weight or self.regression_weight:
            next_hidden = next_hidden_states(batch["hidden"], selected, self.num_heads)  # [K, P, d]
        return self._loss_and_stats(logits, labels[:, selected], states, next_hidden)

    def _loss_and_stats(self, logits: torch.Tensor, labels: torch.Tensor,
                        states: torch.Tensor | None = None, next_hidden: torch.Tensor | None = None):
        """logits [K, P, V'], labels [K, P] target ids, and for the distillation terms the
        heads' states and the target's h_{t+1+i} (both [K, P, d]) -> (loss, stats [K, 5])."""
        valid = labels != IGNORE  # [K, P]
        logit_labels = self.train_labels(labels)  # [K, P] indices into the logits, or IGNORE
        ce = F.cross_entropy(logits.flatten(0, 1), logit_labels.flatten(),
                             ignore_index=IGNORE, reduction="none").view(labels.shape)  # [K, P]
        kl, regression = self._distillation(logits, states, next_hidden, valid)  # [K, P] each
        per_token = ce + self.kl_weight * kl + self.regression_weight * regression
        counts = valid.sum(-1)  # [K]
        # Mean over each head's labelled tokens (a head with none contributes 0, not NaN).
        loss = (self.head_weights.to(logits.device) * per_token.sum(-1) / counts.clamp(min=1)).sum()
        with torch.no_grad():
            vocabulary = self.draft_vocabulary()
            predictions = to_target_ids(logits.argmax(-1), None if vocabulary is None
                                        else vocabulary[0])  # [K, P] target ids
            hits = (predictions == labels) & valid  # [K, P]
            # Kept for validation's acceptance-length estimate (needs per-position hits) and
            # its confidence curve (the heads' top-1 probabilities; not computed in training).
            self.last_hits, self.last_valid = hits, valid
            self.last_predictions = predictions  # [K, P] (the drafting replay reads them)
            # [K, P] labels the draft vocabulary holds (a reduced one: validation's coverage)
            self.last_in_vocabulary = (None if self.training or self.target_to_draft is None
                                       else logit_labels != IGNORE)
            self.last_top1_probs = None if self.training else logits.softmax(-1).amax(-1)  # [K, P]
            stats = torch.stack([ce.sum(-1), hits.sum(-1).float(), counts.float(), kl.sum(-1),
                                 regression.sum(-1)], dim=-1).detach()
        return loss, stats

    def _distillation(self, logits, states, next_hidden, valid):
        """(KL, regression) per head and position [K, P], zero where a term is off or the
        position has no label."""
        zeros = logits.new_zeros(valid.shape)
        if next_hidden is None:
            return zeros, zeros
        kl = regression = zeros
        if self.kl_weight:
            weight = self.target_lm_head()  # [V, d], frozen
            vocabulary = self.draft_vocabulary()
            if vocabulary is not None:
                weight = weight[vocabulary[0].to(weight.device)]  # [V', d]
            with torch.no_grad():
                target_log_p = (next_hidden.float() @ weight.t().float()).log_softmax(-1)  # [K, P, V']
            kl = F.kl_div(logits.log_softmax(-1), target_log_p, log_target=True,
                          reduction="none").sum(-1)  # [K, P]
            kl = torch.where(valid, kl, 0.0)
        if self.regression_weight:
            regression = F.smooth_l1_loss(states.float(), next_hidden.float(),
                                          reduction="none").mean(-1)  # [K, P]
            regression = torch.where(valid, regression, 0.0)
        return kl, regression

    def summarize(self, stats: torch.Tensor) -> dict:
        """Summed stats [K, 5] (over batches and processes) -> the logged figures."""
        counts = stats[:, 2].clamp(min=1)
        head_loss = (stats[:, 0] / counts).tolist()
        head_kl, head_regression = (stats[:, 3] / counts).tolist(), (stats[:, 4] / counts).tolist()
        total = [c + self.kl_weight * k + self.regression_weight * r
                 for c, k, r in zip(head_loss, head_kl, head_regression)]
        out = {"loss": sum(float(w) * t for w, t in zip(self.head_weights, total)),
               "head_loss": head_loss, "head_accuracy": (stats[:, 1] / counts).tolist(),
               "head_tokens": stats[:, 2].long().tolist()}
        if self.kl_weight:
            out["head_kl"] = head_kl
        if self.regression_weight:
            out["head_regression"] = head_regression
        return out


def next_hidden_states(hidden: torch.Tensor, selected: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The target's h_{t+1+i} for head i at the selected positions t: what head i's state is
    the counterpart of (its label is argmax LMHead(h_{t+1+i})).

    hidden [B, L, d], selected [B, L-1] -> [K, P, d]; past the end (t+1+i > L-1, where no
    label exists either) the last position is repeated.
    e.g. L = 5, head 1 at t = 2 reads h_4; at t = 3 (no label) it reads h_4 as well.
    """
    L = hidden.shape[1]
    t = torch.arange(L - 1, device=hidden.device)  # [L-1]
    return torch.stack([hidden[:, (t + 1 + i).clamp(max=L - 1)][selected]
                        for i in range(num_heads)])


def previous_tokens(tokens: torch.Tensor, greedy: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What sequential heads read at positions t = 0 .. L-2, teacher-forced: the token before
    each head's own target, x_{t+1} for head 0 and head i-1's label greedy[t+i] for head i.

    tokens, greedy [B, L] -> [K, B, L-1] target ids; past the end (t+i > L-1, where head i
    has no label either) the last position is repeated.
    e.g. L = 5, t = 2: head 0 reads tokens[3], head 1 greedy[3], heads 2 and 3 greedy[4].
    """
    L = tokens.shape[1]
    t = torch.arange(L - 1, device=tokens.device)  # [L-1]
    rows = [tokens[:, t + 1]] + [greedy[:, (t + i).clamp(max=L - 1)] for i in range(1, num_heads)]
    return torch.stack(rows).clamp(min=0)  # (padding ids are never negative ids of the embedding)


class DraftLoss(HeadsLoss):
    """Chimera's heads: logits_i = LMHead(h_t + R_i([h_t; s_t])), s from the draft's encoders."""

    draft: ChimeraDraftModel

    def draft_vocabulary(self):
        config = self.draft.config
        if config.draft_vocab_size is None:
            return None
        return self.draft.draft_to_target_ids, config.vocab_size

    def draft_inputs(self, batch):
        if self.draft.config.target_layer_ids and "layers" not in batch:
            raise ValueError("this draft reads the target's layers "
                             f"{self.draft.config.target_layer_ids}, the data cache has none")
        layers = batch["layers"] if self.draft.config.target_layer_ids else None
        return self.draft.fuse_target_layers(batch["hidden"], layers)  # [B, L, d]

    def head_states(self, tokens, hidden, selected, greedy):
        B, L = tokens.shape
        positions = torch.arange(L - 1, device=tokens.device).expand(B, L - 1)
        # Chunks start at t = 0: the trigram encoder repeats x_0 before the start.
        prefix = torch.stack([torch.full_like(tokens[:, 0], -1), tokens[:, 0]], dim=1)  # [B, 2]
        h = hidden[:, :-1]  # [B, L-1, d]: h_t for t = 0 .. L-2
        s = self.draft.encode(tokens[:, 1:], h, positions, prefix)  # [B, L-1, d]
        previous = None
        if self.draft.config.sequential_heads:
            previous = previous_tokens(tokens, greedy, self.num_heads)[:, selected]  # [K, P]
        return self.draft.head_states(h[selected], s[selected], previous)  # [K, P, d]

    def project(self, states):
        return self.draft.lm_logits(states)  # [K, P, V or V_draft]

    def target_lm_head(self):
        return self.draft._target_lm_head
