"""The suffix lookup without an engine: its drafts against a brute-force reference, the
global cache's bounds and eviction, the score-chosen draft length, the choice rule, and its
settings (issue 40 §4-5). The engine tests are in test_vllm_lookup.py."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from vllm_chimera.context_lookup import (NUM_BINS, ChoiceCounts, DraftChoice, leading_matches,
                                         score_bin)
from vllm_chimera.vllm import lookup
from vllm_chimera.vllm.spec_config import LookupSettings

needs_arctic = pytest.mark.skipif(importlib.util.find_spec("arctic_inference") is None,
                                  reason="arctic-inference: bash scripts/setup.sh installs it")


def suffix_lookup(max_model_len=512, **settings) -> lookup.SuffixLookup:
    return lookup.SuffixLookup(LookupSettings.parse({"matcher": "suffix", **settings}), max_model_len)


# -- The drafts, by the definition ----------------------------------------------------------
def count(texts: list[list[int]], path: tuple, depth: int) -> int:
    """How many suffixes of the texts (each cut to `depth` tokens) start with `path`."""
    if len(path) > depth:
        return 0
    return sum(1 for text in texts for i in range(len(text) - len(path) + 1)
               if tuple(text[i:i + len(path)]) == path)


def reference_drafts(texts, context, depth, max_tokens, factor, min_prob) -> list[set]:
    """Arctic's suffix decoding by its definition, for each match length m = 1, 2, ...: the
    context's last m tokens (of its last `depth`, m < their number) occur in the texts; from
    there follow the most frequent next token while the path's probability (its count over
    the match's) stays >= min_prob, for at most min(max_tokens, m * factor) tokens. Ties
    between next tokens of equal counts branch: every draft a tie allows is returned, as
    (tokens, probabilities) in the set for m (index m - 1)."""
    pattern = tuple(context[-depth:])
    out = []
    for m in range(1, len(pattern)):
        match = pattern[-m:]
        total = count(texts, match, depth)
        if total == 0:
            break
        limit = min(max_tokens, int(m * factor + 1e-6))
        drafts = set()

        def walk(path, tokens, probs):
            children = {}
            if len(tokens) < limit:
                for token in {t for text in texts for t in text}:
                    n = count(texts, path + (token,), depth)
                    if n:
                        children[token] = n
            best = max(children.values(), default=0)
            ties = [t for t, n in children.items() if n == best]
            grown = False
            for token in ties:
                prob = best / total
                if prob >= min_prob:
                    grown = True
                    walk(path + (token,), tokens + (token,), probs + (prob,))
            if not grown:
                drafts.add((tokens, probs))

        walk(match, (), ())
        out.append(drafts)
    return out


def check_against_reference(texts, context, draft, settings, max_tokens) -> bool:
    """Asserts the draft is one the definition allows, and the best one where no tie
    branched; returns whether it was checked exactly (no tie)."""
    per_length = reference_drafts(texts, context, settings.max_depth, max_tokens,
                                  settings.max_spec_factor, settings.min_token_prob)
    allowed = [(tokens, sum(probs)) for drafts in per_length for tokens, probs in drafts if tokens]
    if draft is None:
        assert not allowed, (context, allowed)
        return all(len(drafts) == 1 for drafts in per_length)
    tokens, score = tuple(draft[0].tolist()), draft[1]
    assert any(t == tokens and s == pytest.approx(score, rel=1e-5) for t, s in allowed), (
        context, tokens, score, allowed)
    # Arctic keeps the best-scored of its drafts, one per match length (whichever a tie
    # gave): at least the best of each length's worst, at most the best of all.
    low = max(min(sum(p) for _, p in drafts) for drafts in per_length)
    high = max(s for _, s in allowed)
    assert low - 1e-5 <= score <= high + 1e-5, (context, tokens, score, per_length)
    return all(len(drafts) == 1 for drafts in per_length)  # (then low == high: exact)


@needs_arctic
@pytest.mark.parametrize("vocab, depth, factor, min_prob", [(3, 6, 1.0, 0.1), (4, 8, 2.0, 0.3),
                                                             (6, 24, 1.0, 0.11)])
def test_own_tree_drafts_by_the_definition(vocab, depth, factor, min_prob):
    """Every step of random requests, fed as an engine feeds them (the context grows by a
    few tokens per step): the own tree's draft is the definition's."""
    rng = np.random.default_rng(vocab)
    exact = checked = 0
    for row in range(6):
        lookup_ = suffix_lookup(max_depth=depth, num_tokens=depth, max_spec_factor=factor,
                                min_token_prob=min_prob, cache_tokens=0)
        text = rng.integers(0, vocab, size=60).astype(np.int32)
        n = 1
        while n < len(text):
            request = lookup_._follow(row, text[:n])
            for max_tokens in (2, depth):
                draft = lookup_.speculate(request, text[:n], max_tokens).get("own")
                exact += check_against_reference([text[:n].tolist()], text[:n].tolist(), draft,
                                                 lookup_.settings, max_tokens)
                checked += 1
            n += int(rng.integers(1, 4))
    assert exact > checked // 4 and checked > 100, (exact, checked)


@needs_arctic
def test_cache_tree_drafts_by_the_definition():
    """The global cache's draft is the definition's over every cached request's text."""
    rng = np.random.default_rng(7)
    lookup_ = suffix_lookup(max_depth=8, num_tokens=8, cache_tokens=1000)
    texts = [rng.integers(0, 6, size=40).astype(np.int32) for _ in range(3)]
    for i, text in enumerate(texts):
        lookup_._follow(i, text)
    lookup_.retire(set())
    assert list(lookup_.cache.entries) == [0, 1, 2]
    exact = 0
    for n in range(2, 40):  # a piece of a cached text, its last token sometimes changed
        start = int(rng.integers(0, 40 - n + 1))
        context = texts[n % 3][start:start + n].copy()
        context[-1] = context[-1] if n % 2 else rng.integers(0, 6)
        request = lookup_._follow("new", context)
        draft = lookup_.speculate(request, context, 8).get("cache")
        exact += check_against_reference([t.tolist() for t in texts], context.tolist(), draft,
                                         lookup_.settings, 8)
        del lookup_._requests["new"]
    assert exact >= 3


@needs_arctic
def test_draft_length_follows_the_counts():
    """A phrase seen three times the same way drafts long; text continued three ways
    drafts nothing at min_token_prob 0.4 (each way 1/3 of the time or less); max_tokens
    and max_spec_factor x the match's length cap the draft."""
    phrase = list(range(10, 30))  # 20 tokens
    certain = np.array(phrase + [1] + phrase + [2] + phrase + [3] + phrase[:10], dtype=np.int32)
    lookup_ = suffix_lookup(min_token_prob=0.4, cache_tokens=0)
    request = lookup_._follow("a", certain)
    # The last 10 tokens occurred 3 times before (and once at the end, which counts): each
    # of phrase[10:] has probability 3/4, and the phrase then ends in three ways (1/4 each).
    # (Longer matches, "3" + phrase[:10], occur only at the end.)
    tokens, score = lookup_.speculate(request, certain, 24)["own"]
    assert tokens.tolist() == phrase[10:] and score == pytest.approx(10 * 0.75)
    assert lookup_.speculate(request, certain, 4)["own"][0].tolist() == phrase[10:14]
    halved = suffix_lookup(min_token_prob=0.4, cache_tokens=0, max_spec_factor=0.5)
    tokens, _ = halved.speculate(halved._follow("a", certain), certain, 24)["own"]
    assert tokens.tolist() == phrase[10:15]  # a 10-token match: at most 5
    ambiguous = np.array([5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 6], dtype=np.int32)
    assert "own" not in lookup_.speculate(lookup_._follow("b", ambiguous), ambiguous, 24)


# -- The global cache -------------------------------------------------------------------------
@needs_arctic
def test_global_cache_bounds_eviction_and_off_switch():
    cache = lookup.GlobalCache(max_tokens=10, max_depth=8)
    cache.add("a", np.arange(4, dtype=np.int32))
    cache.add("b", np.arange(5, dtype=np.int32))
    assert list(cache.entries) == ["a", "b"] and cache.num_tokens == 9
    cache.add("c", np.arange(3, dtype=np.int32))  # 12 > 10: the oldest, a, leaves
    assert list(cache.entries) == ["b", "c"] and cache.num_tokens == 8
    cache.add("d", np.arange(7, dtype=np.int32))  # 15 > 10: b leaves, 10 fit
    assert list(cache.entries) == ["c", "d"] and cache.num_tokens == 10
    cache.add("e", np.arange(30, dtype=np.int32))  # longer than the cache: its last 10
    assert list(cache.entries) == ["e"] and cache.num_tokens == 10
    assert cache.tree.num_seqs() == 1
    cache.add("e", np.arange(2, dtype=np.int32))  # the same id again: the newer text
    assert list(cache.entries) == ["e"] and cache.num_tokens == 2
    off = lookup.GlobalCache(max_tokens=0, max_depth=8)
    off.add("a", np.arange(4, dtype=np.int32))
    assert not off.entries and off.num_tokens == 0 and off.tree.num_seqs() == 0


@needs_arctic
def test_finished_requests_feed_the_cache_and_leave_it():
    """A finished request (gone from the runner's requests) joins the cache, and another
    request drafts its continuation from it; once evicted, no longer."""
    lookup_ = suffix_lookup(cache_tokens=20, choice="lookup-first")
    story = np.array([7, 8, 9, 10, 11, 12, 13, 14, 15, 16], dtype=np.int32)
    assert len(lookup_.draft("a", story, 9, int(story[9]), 8)) == 0  # nothing repeats yet
    lookup_.retire({"a", "b"})  # a is still served (a preempted or unscheduled request)
    assert not lookup_.cache.entries
    lookup_.retire({"b"})
    assert list(lookup_.cache.entries) == ["a"] and lookup_.cache.num_tokens == 10
    quote = np.array([1, 2, 7, 8, 9, 10], dtype=np.int32)
    assert lookup_.draft("b", quote, 5, 10, 8).tolist() == [11, 12, 13, 14]  # m = 4: 4 tokens
    assert lookup_.speculate(lookup_._requests["b"], quote, 8).keys() == {"cache"}
    lookup_.retire(set())  # b: 6 more tokens, 16 in all
    lookup_.cache.add("c", np.arange(100, 110, dtype=np.int32))  # 26 > 20: a leaves
    assert list(lookup_.cache.entries) == ["b", "c"]
    other = np.array([3, 3, 9, 10], dtype=np.int32)
    assert "cache" not in lookup_.speculate(lookup_._follow("d", other), other, 8)
    off = suffix_lookup(cache_tokens=0, choice="lookup-first")
    off.draft("a", story, 9, int(story[9]), 8)
    off.retire(set())
    assert not off.cache.entries and len(off.draft("b", quote, 5, 10, 8)) == 0


@needs_arctic
def test_a_request_id_used_again_starts_over():
    lookup_ = suffix_lookup(cache_tokens=0, choice="lookup-first")
    lookup_.draft("a", np.array([1, 2, 3, 1, 2], dtype=np.int32), 4, 2, 8)
    lookup_.draft("a", np.array([9, 8, 9, 8], dtype=np.int32), 3, 8, 8)  # not a's context
    assert lookup_._requests["a"].tokens[:lookup_._requests["a"].length].tolist() == [9, 8, 9, 8]


# -- The choice rule --------------------------------------------------------------------------
def test_leading_matches_and_score_bins():
    assert leading_matches(np.array([4, 5, 6]), np.array([4, 9])) == (1, True)
    assert leading_matches(np.array([4, 5, 6]), np.array([4, 5])) == (2, False)
    assert leading_matches(np.array([4, 5, 6]), np.array([4, 5, 6, 1])) == (3, True)
    assert [score_bin(s) for s in (None, 0.3, 0.5, 3.9, 20)] == [0, 1, 2, 4, 6]


def test_choice_priors_then_measurements():
    choice = DraftChoice()
    assert choice.choose({"own": 0.4}) is None  # expected 0.4 < HEADS_PRIOR
    assert choice.choose({"own": 2.0}) == "own"
    assert choice.choose({}) is None
    # The docstring's example: own drafts of scores in [2, 4) summing to 40, 20 accepted.
    for _ in range(20):
        choice.lookup_resolved("own", 2.0, 1)
    assert choice.expected("own", 2.0) == pytest.approx(2.0 * 28 / 48)
    # The own tree's drafts around score 1.5 never accepted: the heads take those steps.
    for _ in range(50):
        choice.lookup_resolved("own", 1.5, 0)
    assert choice.choose({"own": 1.5}) is None
    # ... unless the heads turn out worse still there: measured, they lose.
    for _ in range(200):
        choice.heads_verified(1.5, 0)
    assert choice.expected_heads(1.5) < 0.01 and choice.choose({"own": 1.5}) == "own"


def test_choice_calibrates_each_tree_on_its_own():
    """The cache's drafts overrated (scored 3, never accepted): the own tree's lower-scored
    draft is chosen, and then no cache draft at all."""
    choice = DraftChoice()
    for _ in range(40):
        choice.lookup_resolved("cache", 3.0, 0)
        choice.lookup_resolved("own", 1.2, 1)
    assert choice.choose({"own": 1.2, "cache": 3.0}) == "own"
    assert choice.choose({"cache": 3.0}) is None
    first = DraftChoice("lookup-first")  # arctic's rule: the higher score, wherever
    assert first.choose({"own": 1.2, "cache": 3.0}) == "cache"
    assert first.choose({"own": 0.1}) == "own" and first.choose({"own": 1.0, "cache": 1.0}) == "own"
    assert first.counts.chose_cache == [0, 0, 0, 0, 1, 0, 0]
    assert first.counts.chose_own == [0, 1, 0, 1, 0, 0, 0]


@needs_arctic
def test_every_lookup_draft_is_measured_chosen_or_not():
    """The rule picks the heads (by the prior: score below HEADS_PRIOR), yet the lookup's
    draft is booked once the context shows how much of it the target said; the heads'
    acceptance is booked from what the proposer reports; the report sink (lookup.STATS)
    gets the same counts."""
    lookup.STATS.reset()
    lookup_ = suffix_lookup(cache_tokens=0, min_token_prob=0.05)
    # (5, 6) occurred 5 times, the last at the end, followed by 1, 2, 3, 4: a draft of
    # two tokens of probability 1/5 each (a 2-token match drafts at most 2): score 0.4.
    text = [5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 6, 4, 5, 6]
    context = np.array(text, dtype=np.int32)
    assert len(lookup_.draft("a", context, len(text) - 1, text[-1], 8)) == 0  # heads
    [(start, tokens, score, tree)] = lookup_._requests["a"].pending
    assert start == len(text) and tree == "own" and score == pytest.approx(0.4)
    said = list(tokens) + [9]  # the target says exactly the lookup's draft, and then 9
    grown = np.array(text + said, dtype=np.int32)
    lookup_.draft("a", grown, len(grown) - 1, int(grown[-1]), 8, num_accepted=1)
    b = score_bin(score)
    assert lookup_.choice.counts.own_drafts[b] == 1
    assert lookup_.choice.counts.own_accepted[b] == len(tokens)
    assert lookup_.choice.counts.heads_drafts[b] == 1 and lookup_.choice.counts.heads_accepted[b] == 1
    assert lookup.STATS.choice.own_accepted == lookup_.choice.counts.own_accepted
    lookup.STATS.reset()  # a reader's reset: the rule keeps what it learnt
    assert sum(lookup.STATS.choice.own_drafts) == 0 and lookup_.choice.counts.own_drafts[b] == 1
    assert len(ChoiceCounts().as_dict()["own_drafts"]) == NUM_BINS


# -- Settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ({"matcher": "tree"}, "matcher must be one of ('ngram', 'suffix')"),
    ({"matcher": "suffix", "cache_tokens": -1}, "cache_tokens must be an integer >= 0"),
    ({"matcher": "suffix", "cache_tokens": 1.5}, "cache_tokens must be an integer >= 0"),
    ({"matcher": "suffix", "num_tokens": 0}, "num_tokens must be an integer in 1..128"),
    ({"matcher": "suffix", "num_tokens": 30}, "num_tokens=30 must be <= max_depth=24"),
    ({"matcher": "suffix", "max_depth": 0}, "max_depth must be a positive integer"),
    ({"matcher": "suffix", "max_spec_factor": 0}, "max_spec_factor must be a number > 0"),
    ({"matcher": "suffix", "min_token_prob": 1.5}, "min_token_prob must be a number in [0, 1]"),
    ({"matcher": "suffix", "min_token_prob": True}, "min_token_prob must be a number in [0, 1]"),
    ({"matcher": "suffix", "choice": "best"}, "choice must be one of ('measured', 'lookup-first')"),
    ({"matcher": "suffix", "occurrence": "latest"}, "['occurrence'] are settings of matcher 'ngram'"),
    ({"matcher": "ngram", "cache_tokens": 100},
     "['cache_tokens'] are settings of matcher 'suffix', not of 'ngram'"),
    ({"matcher": "suffix", "cache": 100}, "unknown 'lookup' settings ['cache']"),
])
def test_bad_suffix_settings_are_clear_errors(value, message):
    with pytest.raises(ValueError) as error:
        LookupSettings.parse(value)
    assert message in str(error.value)


@needs_arctic
def test_settings_per_matcher_round_trip():
    suffix = LookupSettings.parse({"matcher": "suffix", "cache_tokens": 0})
    assert suffix.to_dict() == {"matcher": "suffix", "num_tokens": 24, "max_depth": 24,
                                "cache_tokens": 0, "max_spec_factor": 1.0,
                                "min_token_prob": 0.1, "choice": "measured"}
    assert LookupSettings.parse(suffix.to_dict()) == suffix  # (vLLM validates it twice)
    ngram = LookupSettings(matcher="ngram")
    assert ngram.to_dict() == {"matcher": "ngram", "num_tokens": 4, "min_match": 2,
                               "max_match": 4, "occurrence": "latest"}
    assert isinstance(lookup.make_lookup(suffix, 64), lookup.SuffixLookup)
    assert isinstance(lookup.make_lookup(ngram, 64), lookup.ContextLookup)


@needs_arctic
def test_the_default_matcher_is_suffix_or_the_one_whose_settings_are_named():
    assert LookupSettings.parse(True) == LookupSettings.parse({}) == LookupSettings()
    assert LookupSettings().matcher == "suffix" and LookupSettings().num_tokens == 24
    assert LookupSettings.parse({"min_match": 3}).matcher == "ngram"
    assert LookupSettings.parse({"cache_tokens": 0}).matcher == "suffix"
    with pytest.raises(ValueError, match="are settings of matcher 'ngram'"):
        LookupSettings.parse({"min_match": 3, "cache_tokens": 0})


def test_suffix_matcher_without_arctic_is_a_clear_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "arctic_inference" else find_spec(name, *a))
    with pytest.raises(ValueError, match="needs arctic-inference 0.3.0.*scripts/setup.sh"):
        LookupSettings.parse({"matcher": "suffix"})
    assert LookupSettings.parse({"matcher": "ngram"}).matcher == "ngram"
    # Unasked for, the suffix matcher gives way to the n-gram one (one warning line).
    assert LookupSettings.parse(True).matcher == "ngram"
    assert LookupSettings.parse({"num_tokens": 6}) == LookupSettings(matcher="ngram", num_tokens=6)
