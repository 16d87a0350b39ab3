"""The context lookup beside Chimera's heads: draft from the request's own text.

Small models repeat themselves, answers quote their prompt, code repeats identifiers: there
the continuation of an earlier occurrence of the last few tokens is a far better draft than
the heads' (vLLM's n-gram method accepts 60% of its first tokens on SmolLM2's MT-bench
answers, Chimera's first head 28%), and costs no model pass. Elsewhere the lookup has
nothing to say and the heads draft. `ContextLookup` finds the context's longest suffix
that occurred before and drafts what followed its latest occurrence
(`vllm_chimera.context_lookup.latest_match`, the default), or its earliest, as vLLM's own
n-gram matcher does (`ngram_proposer._find_longest_matched_ngram_and_propose_tokens`,
numba; lookup occurrence "earliest"). Both find a match at the same steps, of the same
length (`tests/test_vllm_lookup.py`); the latest drafts better (LookupSettings). The
proposer asks it for every request each step, before the heads, and the heads then run
only for the requests without a match.

A request's context at the time the proposer runs (before the runner's bookkeeping of
this step) is spread over two places, e.g. a request with 10 tokens so far that verified
the drafts (d1, d2, d3) and accepted two of them, then sampled b:
    token_ids_cpu[row] = [t0 .. t9, d1, d2, d3, ...]   num_tokens_no_spec = 10
    accepted = 3 - 1 rejected = 2                        next_token_id = b
    context  = [t0 .. t9, d1, d2, b]                     (12 tokens)
The drafts sit in the history right after the accepted tokens, so the context is the
history's first 10 + 2 tokens and the sampled token.

`LookupStats` counts what each source drafted and what of it the target accepted; the
counts live in this process (chimera-bench reads them from its in-process engine).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_chimera.context_lookup import latest_match
from vllm_chimera.vllm.spec_config import LookupSettings

HEADS, LOOKUP = "heads", "lookup"


def _matcher():
    # Imported on first use: numba compiles the matcher (about a second, once per process).
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens

    return _find_longest_matched_ngram_and_propose_tokens


@dataclass
class LookupStats:
    """Per source (heads / lookup): drafting steps, drafted and accepted tokens."""

    num_drafts: dict[str, int] = field(default_factory=lambda: {HEADS: 0, LOOKUP: 0})
    num_draft_tokens: dict[str, int] = field(default_factory=lambda: {HEADS: 0, LOOKUP: 0})
    num_accepted_tokens: dict[str, int] = field(default_factory=lambda: {HEADS: 0, LOOKUP: 0})
    lookup_seconds: float = 0.0  # time spent matching, all steps

    def reset(self) -> None:
        for counts in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens):
            counts.update({HEADS: 0, LOOKUP: 0})
        self.lookup_seconds = 0.0

    def as_dict(self) -> dict:
        return {"num_drafts": dict(self.num_drafts), "num_draft_tokens": dict(self.num_draft_tokens),
                "num_accepted_tokens": dict(self.num_accepted_tokens),
                "lookup_seconds": self.lookup_seconds}


# The counts of every Chimera proposer in this process; readers reset them (STATS.reset()).
# (Drafts the scheduler then drops, for requests Chimera serves without drafts, such as
# logit_bias or seeded ones, are counted as drafted: chimera-bench sends none.)
STATS = LookupStats()


class ContextLookup:
    def __init__(self, settings: LookupSettings, max_model_len: int):
        self.settings = settings
        self.max_model_len = max_model_len
        self._context = np.zeros(max_model_len + 1, dtype=np.int32)  # one request's tokens
        self._match = None
        if settings.occurrence == "earliest":  # vLLM's numba matcher: compile now, not in
            self._match = _matcher()           # the first request's step
            self._match(self._context[:4], settings.min_match, settings.max_match, max_model_len, 1)

    def propose(self, history: np.ndarray, num_tokens: int, next_token_id: int,
                max_tokens: int) -> np.ndarray:
        """Up to `max_tokens` tokens that followed the longest earlier match of the context's
        last min_match..max_match tokens; empty where there is none.

        history: the request's row of the runner's token history, whose first `num_tokens`
        tokens precede `next_token_id` (see the module docstring).
        """
        context = self._context[:num_tokens + 1]  # [num_tokens + 1]
        context[:num_tokens] = history[:num_tokens]
        context[num_tokens] = next_token_id
        max_tokens = min(max_tokens, self.settings.num_tokens, self.max_model_len - len(context))
        if self._match is None:  # occurrence "latest"
            return latest_match(context, self.settings.min_match, self.settings.max_match, max_tokens)
        match = self._match(context, self.settings.min_match, self.settings.max_match,
                            self.max_model_len, max_tokens)
        return match.copy()  # (a view of the scratch context, which the next call overwrites)
