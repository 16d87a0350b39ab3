"""Skipped draft passes (vllm/deferred_rows.py): on steps where no request needs the heads
the encoder pass waits, and the next pass writes the waiting rows' draft KV first.

The engine tests compare what the heads read, s at each request's last row, step by step
against an engine that runs the pass every step: a deferred row whose KV were never
written, or written at another slot, changes the s of every later step of its request."""
from __future__ import annotations

import pytest
import torch

import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
from conftest import build_permutation_pair
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.harness.offline import run_offline
from vllm_chimera.vllm import lookup
from vllm_chimera.vllm.deferred_rows import DeferredRows, prepend
from vllm_chimera.vllm.spec_config import parse_max_deferred_rows
from vllm_utils import TEST_ENGINE

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


# -- DeferredRows and prepend, without an engine --------------------------------------------
def _rows(start: int, n: int, d: int = 2):
    ids = torch.arange(start + 1, start + 1 + n, dtype=torch.int32)  # x_{t+1} of row t
    hidden = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, d)  # h_t = t
    return ids, hidden


def test_deferred_rows_continue_expire_and_count():
    deferred = DeferredRows(max_rows=8)
    deferred.defer("a", 10, *_rows(10, 3))
    deferred.defer("a", 13, *_rows(13, 1))  # continues 10..12
    deferred.defer("b", 0, *_rows(0, 2))
    assert deferred.num_rows == 6 and deferred.fits(2) and not deferred.fits(3)
    start, ids, hidden = deferred.take("a", 14)
    assert start == 10 and ids.tolist() == [11, 12, 13, 14] and hidden[:, 0].tolist() == [10, 11, 12, 13]
    assert deferred.take("a", 14) is None and deferred.num_rows == 2
    deferred.defer("b", 5, *_rows(5, 1))  # not a continuation of 0..1: the old rows go
    assert deferred.num_rows == 1
    assert deferred.take("b", 7) is None and deferred.num_rows == 0  # a gap: dropped, not used
    deferred.defer("c", 3, *_rows(3, 2))
    deferred.retire({"a", "b"})  # c finished
    assert deferred.num_rows == 0 and deferred.take("c", 5) is None


def test_prepend_puts_deferred_rows_before_each_requests_own():
    """The docstring's example: requests with rows 0-1 and 2-4, 3 rows deferred for the
    second (positions 7, 8, 9 before its own 10, 11, 12); block size 4."""
    block_size = 4
    block_table = torch.tensor([[5, 6, 0, 0], [1, 2, 3, 9]], dtype=torch.int32)
    own_positions = torch.tensor([3, 4, 10, 11, 12])
    own_slots = torch.stack([block_table[r, p // block_size] * block_size + p % block_size
                             for r, p in zip([0, 0, 1, 1, 1], own_positions.tolist())])
    cad = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 2, 5], dtype=torch.int32),
        query_start_loc_cpu=torch.tensor([0, 2, 5], dtype=torch.int32),
        seq_lens=torch.tensor([5, 13], dtype=torch.int32), num_reqs=2, num_actual_tokens=5,
        max_query_len=3, max_seq_len=13, block_table_tensor=block_table,
        slot_mapping=own_slots.to(torch.int64))
    input_ids = torch.zeros(16, dtype=torch.int32)
    input_ids[:5] = torch.tensor([4, 5, 11, 12, 13])
    positions = torch.zeros(16, dtype=torch.int64)
    positions[:5] = own_positions
    hidden = torch.zeros(16, 2)
    hidden[:5] = own_positions[:, None].float()
    taken = {1: (7, *_rows(7, 3))}
    num_tokens, sample_rows, merged = prepend(
        taken, cad, 5, torch.tensor([1, 3]), input_ids, positions, hidden, block_size)
    assert num_tokens == 8 and merged.num_actual_tokens == 8 and merged.max_query_len == 6
    assert merged.query_start_loc_cpu.tolist() == [0, 2, 8]
    assert merged.query_start_loc.tolist() == [0, 2, 8]
    assert merged.seq_lens.tolist() == [5, 13]  # the context ends where it did
    assert positions[:8].tolist() == [3, 4, 7, 8, 9, 10, 11, 12]
    assert input_ids[:8].tolist() == [4, 5, 8, 9, 10, 11, 12, 13]
    assert hidden[:8, 0].tolist() == [3, 4, 7, 8, 9, 10, 11, 12]
    # Position p of request 1 lives in block block_table[1, p // 4], at offset p % 4.
    expected = [5 * 4 + 3, 6 * 4 + 0, 2 * 4 + 3, 3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0]
    assert merged.slot_mapping.tolist() == expected
    assert sample_rows.tolist() == [1, 6]  # request 1's row 3 moved by its 3 deferred rows


@pytest.mark.parametrize("value, ok", [(None, 512), (0, 0), (64, 64), (-1, None), (True, None),
                                       (2.0, None)])
def test_max_deferred_rows_setting(value, ok):
    if ok is None:
        with pytest.raises(ValueError, match="max_deferred_rows must be an integer >= 0"):
            parse_max_deferred_rows(value)
    else:
        assert parse_max_deferred_rows(value) == ok


# -- In vLLM --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The permutation target and a draft that knows pi for 3/4 of the tokens."""
    folder = tmp_path_factory.mktemp("deferred_pair")
    target, draft, pi = build_permutation_pair(folder, num_heads=4, num_wrong=32)
    save_draft(draft, folder / "draft")
    return folder, pi


def _quoting_prompts(pi, num_prompts: int, seed: int) -> list[list[int]]:
    """path(a, 16), filler, path(a, 3): the target's next 13 tokens are quoted in the
    prompt, so every request drafts from the lookup for its first steps (all at once: the
    passes are skipped), then from the heads (the pass runs with the waiting rows)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for a, filler in zip(torch.randint(0, 128, (num_prompts,), generator=g).tolist(),
                         torch.randint(0, 128, (num_prompts, 5), generator=g).tolist()):
        path = [a]
        while len(path) < 16:
            path.append(int(pi[path[-1]]))
        prompts.append(path + filler + path[:3])
    return prompts


def _record_head_inputs(monkeypatch) -> list:
    """Every (h, s) the heads draft from, [num_rows, d] each, in step order."""
    from vllm_chimera.vllm.proposer import ChimeraProposer

    recorded = []
    draft_tokens = ChimeraProposer._draft_tokens

    def recording(self, h, s, num_tokens, next_token_ids):
        if num_tokens > 0:
            recorded.append((h.clone(), s.clone()))
        return draft_tokens(self, h, s, num_tokens, next_token_ids)

    monkeypatch.setattr(ChimeraProposer, "_draft_tokens", recording)
    return recorded


def _run(folder, prompts, params, spec_extra, **engine):
    lookup.STATS.reset()
    spec = {"method": "chimera", "model": str(folder / "draft"), "num_speculative_tokens": 4,
            **spec_extra}
    run = run_offline(folder / "target", prompts, params, spec, **{**TEST_ENGINE, **engine})
    return run, lookup.STATS.as_dict()


def _assert_same_head_inputs(deferred: list, every_step: list) -> None:
    assert len(deferred) == len(every_step) > 0
    for step, ((h, s), (h_ref, s_ref)) in enumerate(zip(deferred, every_step)):
        torch.testing.assert_close(h, h_ref, msg=f"h differs at heads step {step}")
        torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"s differs at heads step {step}: {m}")


@pytest.mark.parametrize("lookup_setting", [True, {"matcher": "suffix"}])
def test_skipped_passes_write_the_draft_kv_on_the_next_pass(pair, monkeypatch, lookup_setting):
    folder, pi = pair
    prompts = _quoting_prompts(pi, 4, seed=0)
    plain = run_offline(folder / "target", prompts, GREEDY, None, **TEST_ENGINE)
    recorded = {}
    for max_rows in (0, 512):
        recorded[max_rows] = _record_head_inputs(monkeypatch)
        run, stats = _run(folder, prompts, GREEDY,
                          {"lookup": lookup_setting, "max_deferred_rows": max_rows})
        monkeypatch.undo()
        assert run.token_ids == plain.token_ids, max_rows
        if max_rows == 0:
            assert stats["num_skipped_passes"] == stats["num_deferred_rows"] == 0
        else:  # passes were skipped, and their rows encoded later (prompts included)
            assert stats["num_skipped_passes"] >= 2, stats
            assert stats["num_deferred_rows"] >= 4 * len(prompts[0]), stats
    _assert_same_head_inputs(recorded[512], recorded[0])


def test_stepping_aside_defers_the_draft_kv_until_drafting_resumes(pair, monkeypatch):
    """Batch >= 2 stands aside (K = 0); as requests finish (different lengths) the batch
    shrinks to 1 and the heads draft again, from a complete context: the same s as an
    engine that ran the pass at every aside step (VLLM_CHIMERA_ASIDE_KEEPS_KV=1)."""
    from vllm_chimera.vllm.proposer import ASIDE_KEEPS_KV_ENV

    folder, pi = pair
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 128, (3, 6), generator=g).tolist()
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (12, 20, 48)]
    plain = run_offline(folder / "target", prompts, params, None, **TEST_ENGINE)
    spec = {"lookup": False, "num_speculative_tokens_per_batch_size": [(1, 1, 4), (2, 64, 0)]}
    recorded, passes = {}, {}
    for keep in ("1", "0"):
        monkeypatch.setenv(ASIDE_KEEPS_KV_ENV, keep)
        recorded[keep] = _record_head_inputs(monkeypatch)
        run, stats = _run(folder, prompts, params, spec)
        monkeypatch.undo()
        assert run.token_ids == plain.token_ids, keep
        passes[keep] = stats
    assert passes["1"]["num_skipped_passes"] == 0
    assert passes["0"]["num_skipped_passes"] >= 19, passes  # every step of batch 2 and 3
    assert passes["0"]["num_deferred_rows"] >= 6 + 19, passes  # the long request: prompt, 19 steps
    _assert_same_head_inputs(recorded["0"], recorded["1"])


def test_a_full_budget_runs_the_pass(pair, monkeypatch):
    """max_deferred_rows 4: no step's rows fit (2 requests, each with its prompt, then 5
    rows a step: 4 lookup drafts accepted and the token sampled), every pass runs; 56
    fits both prompts (48 rows): the first pass waits."""
    folder, pi = pair
    prompts = _quoting_prompts(pi, 2, seed=1)  # 24 tokens each
    plain = run_offline(folder / "target", prompts, GREEDY, None, **TEST_ENGINE)
    for max_rows, skipped in ((4, False), (56, True)):
        run, stats = _run(folder, prompts, GREEDY, {"lookup": True, "max_deferred_rows": max_rows})
        assert run.token_ids == plain.token_ids
        assert (stats["num_skipped_passes"] > 0) == skipped, (max_rows, stats)


def test_max_deferred_rows_reaches_the_engine(pair):
    folder, _ = pair
    with pytest.raises(Exception, match="max_deferred_rows must be an integer >= 0"):
        _run(folder, [[1, 2]], GREEDY, {"max_deferred_rows": -3})
    with pytest.raises(Exception, match="is a setting of the 'chimera' method"):
        run_offline(folder / "target", [[1, 2]], GREEDY,
                    {"method": "ngram", "num_speculative_tokens": 2, "max_deferred_rows": 8,
                     "prompt_lookup_max": 3}, **TEST_ENGINE)
