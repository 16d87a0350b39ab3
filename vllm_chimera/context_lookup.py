"""The context lookup's rules, from the token ids alone: where it drafts, and what.

Inside vLLM the proposer first asks the context lookup (`vllm_chimera/vllm/lookup.py`) for
each request's draft, and the heads draft only where it finds no match. A match exists
exactly when the context's last `min_match` tokens occur earlier in the context (any
earlier occurrence, overlapping the suffix or not; a longer match contains this one). So a
training run can tell which positions the heads will ever be asked to draft at, and spend
its budget there (`chimera-train --skip-lookup-matches`), and validation can score the
heads where they matter (`lookup_matches`). Small models repeat themselves: the lookup
matches at 73% of the positions of SmolLM2's own answers to held-out ShareGPT prompts and
at 60% of its MT-bench answers' (validation's `lookup_misses` share;
results/training/README.md, "Where the heads draft"). What it drafts there:
`latest_match`.

`tests/test_vllm_lookup.py` checks both against vLLM's n-gram matcher.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields

import numpy as np
import torch

# speculative_config["lookup"]["min_match"] when unset (LookupSettings reads it from here).
DEFAULT_MIN_MATCH = 2
# speculative_config["lookup"]["occurrence"]: which earlier occurrence of the matched suffix
# the lookup drafts from; "latest" (`latest_match`, the default) or "earliest" (vLLM's
# n-gram matcher).
OCCURRENCES = ("latest", "earliest")


def latest_match(context: np.ndarray, min_match: int, max_match: int, num_tokens: int) -> np.ndarray:
    """The tokens that followed the latest earlier occurrence of the context's longest
    suffix of min_match..max_match tokens: up to num_tokens of them, empty if none occurs.

    vLLM's n-gram matcher finds the same longest suffix but drafts from its earliest
    occurrence. The latest is the better guess: text repeats what it said last (a list's
    items, a refrain, an identifier's recent uses). Replayed over the target's held-out
    answers with the shipped draft, the latest gives 2.615 tokens per step against 2.480
    (results/training/README.md, "The latest occurrence").

    context [n] token ids -> [<= num_tokens] int32. e.g. min 2, max 4, num_tokens 2:
        context 5 7 1 5 7 2 5 7 (x_0 .. x_7): (2, 5, 7) never occurred before, (5, 7) did,
        ending at 1 and at 4; the latest, 4, was followed by x_5 x_6 -> [2, 5]
        (vLLM's matcher drafts what followed the earliest, x_2 x_3 -> [1, 5])
    """
    n = len(context)
    if n < min_match + 1 or num_tokens < 1:
        return np.empty(0, dtype=np.int32)
    context = np.asarray(context)
    # lengths[e], e = 0 .. n-2: how many of the tokens ending at e equal the context's last
    # ones, in a row (up to max_match); the suffix itself (e = n-1) is not an occurrence.
    lengths = np.zeros(n - 1, dtype=np.int64)  # [n-1]
    alive = np.ones(n - 1, dtype=bool)  # [n-1] tokens e-j+1 .. e all matched so far
    for j in range(min(max_match, n - 1)):
        alive[:j] = False  # an occurrence ending at e < j has no token j back
        alive[j:] &= context[:n - 1 - j] == context[n - 1 - j]  # x_{e-j} == x_{n-1-j}
        lengths += alive
    longest = int(lengths.max())
    if longest < min_match:
        return np.empty(0, dtype=np.int32)
    end = int(np.flatnonzero(lengths == longest)[-1])  # the latest of the longest
    return context[end + 1:end + 1 + num_tokens].astype(np.int32)


def lookup_matches(tokens: torch.Tensor, lengths: torch.Tensor, min_match: int) -> torch.Tensor:
    """Where the lookup has a match when the draft runs at position t.

    tokens [B, L] token ids, lengths [B] real lengths -> [B, L-1] bool. The draft at t runs
    on the context x_0 .. x_{t+1} (the target has just sampled x_{t+1}; head i drafts
    x_{t+2+i}), and the lookup matches there iff the `min_match` tokens ending at t+1 also
    end at some earlier index. Positions past a row's length are False.

    e.g. min_match 2, tokens [5, 7, 5, 7, 9]:
        t=0  context [5, 7]            suffix (5, 7) new        -> False
        t=1  context [5, 7, 5]         suffix (7, 5) new        -> False
        t=2  context [5, 7, 5, 7]      suffix (5, 7) ended at 1 -> True
        t=3  context [5, 7, 5, 7, 9]   suffix (7, 9) new        -> False
    """
    if min_match < 1:
        raise ValueError(f"min_match must be >= 1, got {min_match}")
    B, L = tokens.shape
    out = np.zeros((B, max(L - 1, 0)), dtype=bool)
    rows = tokens.detach().cpu().numpy()
    for b, n in enumerate(lengths.tolist()):
        if n < min_match:
            continue
        # windows[w] = x_w .. x_{w+m-1}, the m-gram ending at e = w + m - 1.
        windows = np.lib.stride_tricks.sliding_window_view(rows[b, :n], min_match)  # [n-m+1, m]
        _, first, inverse = np.unique(windows, axis=0, return_index=True, return_inverse=True)
        seen_before = first[inverse.reshape(-1)] < np.arange(len(windows))  # [n-m+1]
        ends = np.arange(min_match - 1, n)  # e, the context's last index; t = e - 1
        keep = ends >= 1
        out[b, ends[keep] - 1] = seen_before[keep]
    return torch.from_numpy(out).to(tokens.device)


# -- The choice between the lookup's drafts and the heads' (40 §5) -------------------------
# speculative_config["lookup"]["choice"]: "measured" (DraftChoice) or "lookup-first" (a
# lookup draft wherever there is one, the higher-scored of the two trees' as in vLLM's
# suffix method; the n-gram lookup always drafts first).
CHOICES = ("measured", "lookup-first")
# The suffix lookup's two trees: the request's own text ("own") and the global cache of
# earlier requests ("cache"). Each is calibrated on its own: the cache's counts come from
# other conversations and overrate what this one will say.
TREES = ("own", "cache")
# A suffix draft's score is its tree's estimate of the tokens the target will accept (the
# sum of each draft token's estimated probability that it and all before it are right).
# Drafts are calibrated and compared per score bin: [0, .5), [.5, 1), ..., [8, inf); bin 0
# holds the steps without a lookup draft (the heads' acceptance there is measured too).
SCORE_EDGES = (0.5, 1.0, 2.0, 4.0, 8.0)
NUM_BINS = len(SCORE_EDGES) + 2


def score_bin(score: float | None) -> int:
    """0 for no draft (None), else 1 + the score's bin: e.g. 0.3 -> 1, 0.5 -> 2, 3.9 -> 4,
    20 -> 6."""
    return 0 if score is None else 1 + bisect.bisect_right(SCORE_EDGES, score)


def leading_matches(draft: np.ndarray, continuation: np.ndarray) -> tuple[int, bool]:
    """How many of the draft's first tokens the continuation repeats, and whether that is
    final (a mismatch seen, or the whole draft matched); a continuation shorter than the
    draft that matches all of it so far is not final.

    e.g. draft [4, 5, 6]: continuation [4, 9] -> (1, True); [4, 5] -> (2, False);
    [4, 5, 6, 1] -> (3, True)
    """
    n = min(len(draft), len(continuation))
    differ = np.flatnonzero(np.asarray(draft[:n]) != np.asarray(continuation[:n]))
    if len(differ):
        return int(differ[0]), True
    return n, n == len(draft)


def _bins() -> list:
    return [0] * NUM_BINS


@dataclass
class ChoiceCounts:
    """Per score bin (score_bin): what each tree's drafts would have had accepted, every
    one of them (chosen or not: `leading_matches` against the tokens that followed), what
    the heads' drafts had accepted (binned by the best lookup draft's score at that step),
    and what the rule chose (binned by the chosen draft's score; the heads' by the best
    lookup draft's)."""

    own_drafts: list = field(default_factory=_bins)
    own_accepted: list = field(default_factory=_bins)
    own_score: list = field(default_factory=_bins)  # scores summed
    cache_drafts: list = field(default_factory=_bins)
    cache_accepted: list = field(default_factory=_bins)
    cache_score: list = field(default_factory=_bins)
    heads_drafts: list = field(default_factory=_bins)
    heads_accepted: list = field(default_factory=_bins)
    chose_own: list = field(default_factory=_bins)
    chose_cache: list = field(default_factory=_bins)
    chose_heads: list = field(default_factory=_bins)  # bin 0: no lookup draft at all

    def as_dict(self) -> dict:
        return {"score_edges": list(SCORE_EDGES), **{f.name: list(getattr(self, f.name))
                                                     for f in fields(self)}}


class DraftChoice:
    """Per request and step: one of the lookup's drafts (its own tree's, the cache's) or the
    heads', whichever is expected to have the most tokens accepted, each expectation
    measured on this engine's own traffic.

    A tree's draft: its score times the calibration of that tree in that score bin,
    accepted / scores summed over the tree's drafts there so far (a tree's counts misjudge
    text seen once or twice, and the cache's come from other requests). Every lookup draft
    is measured, chosen or not, so a bin the rule avoids still learns. The heads': their
    accepted tokens per draft in the bin (steps whose best lookup draft scored there),
    shrunk towards their mean over all bins where the bin has few drafts. Each estimate
    starts from a prior worth PRIOR_DRAFTS drafts (calibration 1, HEADS_PRIOR tokens).

    e.g. with no measurements: own draft of score 0.4 -> expected 0.4 < HEADS_PRIOR: heads;
    score 2.0 -> 2.0 > HEADS_PRIOR: the own draft. Once the own tree's drafts of scores in
    [2, 4) summing to 40 had 20 tokens accepted, a score of 2.0 expects
    2.0 * (20 + 8) / (40 + 8) = 1.17.
    """

    PRIOR_DRAFTS = 8  # weight of each prior, in drafts: a few real ones outweigh it
    # Accepted tokens per heads draft before any is measured: below what the shipped SmolLM2
    # draft's heads accept per step when they draft everywhere (heads-only in
    # results/training/replay-drafting/heldout80-latest/replay.json), since they draft
    # where the lookup is weak, in text that repeats less.
    HEADS_PRIOR = 0.5

    def __init__(self, rule: str = "measured", report=None):
        if rule not in CHOICES:
            raise ValueError(f"lookup choice must be one of {CHOICES}, got {rule!r}")
        self.rule = rule
        self.counts = ChoiceCounts()  # what the rule learns from (never reset)
        # () -> ChoiceCounts: where the counts are also added, for reports (lookup.STATS's,
        # which readers reset without resetting what the rule has learnt).
        self.report = report

    def _add(self, name: str, b: int, value) -> None:
        for counts in (self.counts, self.report() if self.report is not None else None):
            if counts is not None:
                getattr(counts, name)[b] += value

    def expected(self, tree: str, score: float) -> float:
        """Accepted tokens expected of `tree`'s draft of this score."""
        c, b, w = self.counts, score_bin(score), self.PRIOR_DRAFTS
        accepted, scores = getattr(c, f"{tree}_accepted")[b], getattr(c, f"{tree}_score")[b]
        return score * (accepted + w) / (scores + w)

    def expected_heads(self, score: float | None) -> float:
        """Accepted tokens expected of the heads at a step whose best lookup draft has this
        score (None: none)."""
        c, b, w = self.counts, score_bin(score), self.PRIOR_DRAFTS
        mean = (sum(c.heads_accepted) + w * self.HEADS_PRIOR) / (sum(c.heads_drafts) + w)
        return (c.heads_accepted[b] + w * mean) / (c.heads_drafts[b] + w)

    def choose(self, scores: dict) -> str | None:
        """scores {tree: its draft's score} (trees without a draft left out) -> the tree
        whose draft to use, or None: the heads. Counted."""
        best = max(scores, key=scores.get, default=None)  # (the own tree on ties)
        if best is None:
            self._add("chose_heads", 0, 1)
            return None
        if self.rule == "measured":
            best = max(scores, key=lambda tree: self.expected(tree, scores[tree]))
            if self.expected(best, scores[best]) < self.expected_heads(max(scores.values())):
                self._add("chose_heads", score_bin(max(scores.values())), 1)
                return None
        self._add(f"chose_{best}", score_bin(scores[best]), 1)
        return best

    def lookup_resolved(self, tree: str, score: float, accepted: int) -> None:
        """`tree`'s draft of this score, chosen or not, would have had `accepted` tokens
        accepted (leading_matches against the tokens that followed)."""
        b = score_bin(score)
        self._add(f"{tree}_drafts", b, 1)
        self._add(f"{tree}_accepted", b, accepted)
        self._add(f"{tree}_score", b, score)

    def heads_verified(self, score: float | None, accepted: int) -> None:
        """The heads drafted at a step whose best lookup draft had this score (None: none),
        and `accepted` of their drafts were accepted."""
        b = score_bin(score)
        self._add("heads_drafts", b, 1)
        self._add("heads_accepted", b, accepted)
