"""The context lookup beside Chimera's heads: draft from the request's own text, and with
the suffix matcher from earlier requests' text too.

Small models repeat themselves, answers quote their prompt, code repeats identifiers: there
the continuation of an earlier occurrence of the last few tokens is a far better draft than
the heads' where a match exists (docs/history.md, "The context lookup"), and costs no
model pass. Elsewhere the lookup has
nothing to say and the heads draft. `ContextLookup` finds the context's longest suffix
that occurred before and drafts what followed its latest occurrence
(`vllm_chimera.context_lookup.latest_match`, the default), or its earliest, as vLLM's own
n-gram matcher does (`ngram_proposer._find_longest_matched_ngram_and_propose_tokens`,
numba; lookup occurrence "earliest"). Both find a match at the same steps, of the same
length (`tests/test_vllm_lookup.py`); the latest drafts better (LookupSettings). The
proposer asks it for every request each step, before the heads, and the heads then run
only for the requests without a lookup draft.

A request's context at the time the proposer runs (before the runner's bookkeeping of
this step) is spread over two places, e.g. a request with 10 tokens so far that verified
the drafts (d1, d2, d3) and accepted two of them, then sampled b:
    token_ids_cpu[row] = [t0 .. t9, d1, d2, d3, ...]   num_tokens_no_spec = 10
    accepted = 3 - 1 rejected = 2                        next_token_id = b
    context  = [t0 .. t9, d1, d2, b]                     (12 tokens)
The drafts sit in the history right after the accepted tokens, so the context is the
history's first 10 + 2 tokens and the sampled token.

`SuffixLookup` (lookup matcher "suffix") is vLLM's suffix decoding (its `suffix` method,
arctic-inference's SuffixDecodingCache) made a Chimera lookup: a suffix tree over each
request's context plus a global tree over earlier requests' prompts and outputs (at most
cache_tokens tokens, the oldest requests leaving first). Each tree drafts up to num_tokens
tokens, as many as its counts support (arctic's rule: the most frequent continuation of
the context's best-scoring matched suffix, while its estimated probability stays at least
min_token_prob and its length within max_spec_factor x the match's); each step the own
tree's draft, the cache's or the heads' is chosen by measured acceptance
(context_lookup.DraftChoice). It keeps state per request (its tree), keyed by vLLM's
req_id; a request that leaves the runner's requests has finished, and its text joins the
global tree (`retire`).

`LookupStats` counts what each source drafted and what of it the target accepted, and the
choice rule's counts per score bin (`choice`); the counts live in this process
(chimera-bench reads them from its in-process engine).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field

import numpy as np

from vllm_chimera.context_lookup import ChoiceCounts, DraftChoice, latest_match, leading_matches
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
    # Draft passes skipped (no request needed the heads), and rows encoded late because of it.
    num_skipped_passes: int = 0
    num_deferred_rows: int = 0
    # The suffix matcher's choice rule, per score bin (empty with the n-gram matcher).
    choice: ChoiceCounts = field(default_factory=ChoiceCounts)

    def reset(self) -> None:
        for counts in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens):
            counts.update({HEADS: 0, LOOKUP: 0})
        self.lookup_seconds = 0.0
        self.num_skipped_passes = self.num_deferred_rows = 0
        self.choice = ChoiceCounts()

    def as_dict(self) -> dict:
        return {"num_drafts": dict(self.num_drafts), "num_draft_tokens": dict(self.num_draft_tokens),
                "num_accepted_tokens": dict(self.num_accepted_tokens),
                "lookup_seconds": self.lookup_seconds, "num_skipped_passes": self.num_skipped_passes,
                "num_deferred_rows": self.num_deferred_rows, "choice": self.choice.as_dict()}


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

    def draft(self, req_id: Hashable, history: np.ndarray, num_tokens: int, next_token_id: int,
              max_tokens: int, num_accepted: int | None = None) -> np.ndarray:
        """`propose`, under the interface SuffixLookup keeps state behind (this keeps none)."""
        return self.propose(history, num_tokens, next_token_id, max_tokens)

    def retire(self, live_req_ids: Collection) -> None:
        """(Nothing to forget: see SuffixLookup.retire.)"""


def suffix_tree_class():
    """arctic-inference's suffix tree (C++): what its SuffixDecodingCache, and so vLLM's
    `suffix` method, keeps per prompt and for earlier responses. Chimera's lookup uses the
    tree itself: its global cache is bounded in tokens and holds prompts too."""
    try:
        from arctic_inference.suffix_decoding._C import SuffixTree
    except ImportError as error:
        raise ImportError(
            "chimera: lookup matcher 'suffix' needs arctic-inference 0.3.0 (its suffix tree; "
            "a source package): `bash scripts/setup.sh` builds and installs it, or use "
            "lookup matcher 'ngram'") from error
    return SuffixTree


class GlobalCache:
    """Finished requests' prompts and outputs in one suffix tree, at most `max_tokens`
    tokens in all: adding a request evicts the oldest ones beyond that; a request longer
    than the whole cache keeps its last `max_tokens` tokens. max_tokens 0: nothing is kept.

    e.g. max_tokens 10: add a (4 tokens), b (5): 9 tokens; add c (3): 12 > 10, a leaves: 8.
    """

    def __init__(self, max_tokens: int, max_depth: int):
        self.max_tokens = max_tokens
        self.tree = suffix_tree_class()(max_depth)
        self.entries: OrderedDict = OrderedDict()  # req_id -> (seq_id, num_tokens), oldest first
        self.num_tokens = 0
        self._next_seq_id = 0

    def add(self, req_id: Hashable, tokens: np.ndarray) -> None:
        if self.max_tokens == 0 or len(tokens) == 0:
            return
        if req_id in self.entries:  # (a request id used again: the newer text counts)
            self.remove(req_id)
        tokens = np.ascontiguousarray(tokens[-self.max_tokens:], dtype=np.int32)  # [<= max_tokens]
        # Sequence ids are the tree's int32 keys; they would wrap after 2^31 requests, long
        # after the first ones left.
        seq_id, self._next_seq_id = self._next_seq_id, (self._next_seq_id + 1) & 0x7FFFFFFF
        self.tree.extend_ndarray(seq_id, tokens)
        self.entries[req_id] = (seq_id, len(tokens))
        self.num_tokens += len(tokens)
        while self.num_tokens > self.max_tokens:
            self.remove(next(iter(self.entries)))

    def remove(self, req_id: Hashable) -> None:
        seq_id, num_tokens = self.entries.pop(req_id)
        self.tree.remove(seq_id)
        self.num_tokens -= num_tokens


@dataclass
class _Request:
    """A request SuffixLookup follows: its context so far, the suffix tree over it, its
    lookup drafts still waiting for the tokens that tell how many would be accepted, and
    who drafted its last step (with that step's lookup score)."""

    tree: object  # arctic's SuffixTree over tokens[:length], as sequence 0
    tokens: np.ndarray  # [capacity] int32
    length: int = 0
    pending: list = field(default_factory=list)  # [(start, [n] draft tokens, score, tree)]
    last: tuple | None = None  # (HEADS or LOOKUP, the best lookup draft's score or None)


class SuffixLookup:
    """Drafts from a suffix tree over each request's context and the global cache of
    earlier requests (module docstring), where DraftChoice expects them to beat the heads.
    """

    def __init__(self, settings: LookupSettings, max_model_len: int):
        self.settings = settings
        self.max_model_len = max_model_len
        self._tree_class = suffix_tree_class()
        self.cache = GlobalCache(settings.cache_tokens, settings.max_depth)
        self.choice = DraftChoice(settings.choice, report=lambda: STATS.choice)
        self._requests: dict[Hashable, _Request] = {}
        self._context = np.zeros(max_model_len + 1, dtype=np.int32)  # one request's tokens

    def draft(self, req_id: Hashable, history: np.ndarray, num_tokens: int, next_token_id: int,
              max_tokens: int, num_accepted: int | None = None) -> np.ndarray:
        """The request's lookup draft this step ([<= max_tokens] int32), empty where it has
        none or the heads are expected to do better.

        history, num_tokens, next_token_id: the request's context, as ContextLookup.propose
        takes it. num_accepted: how many of the request's last drafts the target accepted
        (None where the caller does not know), booked to the source that drafted them.
        """
        context = self._context[:num_tokens + 1]  # [num_tokens + 1]
        context[:num_tokens] = history[:num_tokens]
        context[num_tokens] = next_token_id
        max_tokens = min(max_tokens, self.settings.num_tokens, self.max_model_len - len(context))
        request = self._follow(req_id, context)
        if num_accepted is not None and request.last is not None and request.last[0] == HEADS:
            self.choice.heads_verified(request.last[1], num_accepted)
        drafts = self.speculate(request, context, max_tokens)  # {tree: (tokens, score)}
        request.pending = [p for p in request.pending if p[0] != len(context)]
        for tree, (tokens, score) in drafts.items():  # each measured, chosen or not
            request.pending.append((len(context), tokens, score, tree))
        chosen = self.choice.choose({tree: score for tree, (_, score) in drafts.items()})
        best_score = max((score for _, score in drafts.values()), default=None)
        request.last = (HEADS if chosen is None else LOOKUP, best_score)
        return np.empty(0, dtype=np.int32) if chosen is None else drafts[chosen][0]

    def speculate(self, request: _Request, context: np.ndarray, max_tokens: int) -> dict:
        """Each tree's draft where it has one: {"own" / "cache": ([n] int32 tokens, score)}."""
        s = self.settings
        if max_tokens < 1:
            return {}
        # The trees hold paths of at most max_depth tokens, so only the context's last
        # max_depth tokens can match (arctic matches strictly shorter suffixes of it).
        pattern = np.ascontiguousarray(context[-s.max_depth:])  # [<= max_depth]
        drafts = {}
        for name, tree in (("own", request.tree), ("cache", self.cache.tree)):
            if name == "cache" and not self.cache.entries:
                continue
            draft = tree.speculate_ndarray(pattern, max_tokens, s.max_spec_factor, 0.0,
                                           s.min_token_prob, False)
            if draft.token_ids:
                drafts[name] = (np.asarray(draft.token_ids, dtype=np.int32), float(draft.score))
        return drafts

    def _follow(self, req_id: Hashable, context: np.ndarray) -> _Request:
        """The request's state, its tree extended by the context's new tokens, and its
        pending drafts resolved by them."""
        request = self._requests.get(req_id)
        if request is not None and (len(context) < request.length or not np.array_equal(
                request.tokens[:request.length], context[:request.length])):
            request = None  # not the context it had (a request id used again): start over
        if request is None:
            request = _Request(self._tree_class(self.settings.max_depth),
                               np.zeros(self.max_model_len + 1, dtype=np.int32))
            self._requests[req_id] = request
        new = np.ascontiguousarray(context[request.length:])  # [n_new]
        if len(new):
            request.tree.extend_ndarray(0, new)
            request.tokens[request.length:len(context)] = new
            request.length = len(context)
            self._resolve(request, final=False)
        return request

    def _resolve(self, request: _Request, final: bool) -> None:
        """Book each pending draft whose acceptance the context now tells (all of them if
        `final`: the request has ended, and what matched so far is what it had)."""
        still = []
        for start, tokens, score, tree in request.pending:
            accepted, known = leading_matches(tokens, request.tokens[start:request.length])
            if known or final:
                self.choice.lookup_resolved(tree, score, accepted)
            else:
                still.append((start, tokens, score, tree))
        request.pending = still

    def retire(self, live_req_ids: Collection) -> None:
        """Requests followed here but no longer among `live_req_ids` (the runner's requests:
        those it still serves, preempted or unscheduled ones included) have finished: their
        text joins the global cache."""
        for req_id in [r for r in self._requests if r not in live_req_ids]:
            request = self._requests.pop(req_id)
            self._resolve(request, final=True)
            self.cache.add(req_id, request.tokens[:request.length])


def make_lookup(settings: LookupSettings, max_model_len: int) -> ContextLookup | SuffixLookup:
    """The lookup of settings.matcher: ContextLookup ("ngram") or SuffixLookup ("suffix")."""
    if settings.matcher == "suffix":
        return SuffixLookup(settings, max_model_len)
    return ContextLookup(settings, max_model_len)
