"""Attention mask for verifying a static token tree in one target pass.

A tree of T nodes (node 0 = root, parents[i] < i) is verified for B sequences at once.
Sequence b has prefix_lens[b] tokens in its KV cache; its KV layout for the pass is
[prefix tokens, then the T tree nodes in node order], and its query rows are the T tree
nodes. Node i sees every prefix token and the tree nodes on its own root path.

Worked example: the tree root -> {A, B}, A -> {C} is parents = [-1, 0, 0, 1]
(nodes 0=root, 1=A, 2=B, 3=C). With prefix_lens = [2] and max_kv_len = 7:

            prefix  root  A  B  C  pad
    kv j:    0  1    2    3  4  5   6
    root  [  1  1    1    0  0  0   0 ]
    A     [  1  1    1    1  0  0   0 ]
    B     [  1  1    1    0  1  0   0 ]
    C     [  1  1    1    1  0  1   0 ]
"""
from __future__ import annotations

import torch

from chimera_kernels._dispatch import (INDEX_DTYPES, KernelLaunch, cdiv, check_tensor, check_triton_device,
                                       next_power_of_2, use_triton, values_readable)

tl = None  # triton.language, bound on first use by jit_kernel (importing this module never imports triton)


def _check_inputs(parents: torch.Tensor, prefix_lens: torch.Tensor,
                  max_kv_len: int | None) -> tuple[int, int]:
    """Validate; return (max_kv_len, a bound on the tree's depth for the kernel's parent walk).

    Values are read only where that is free (see values_readable): on a GPU, a caller that
    passes max_kv_len costs no device-to-host copy, and the depth bound is then T - 1 (a
    chain is the deepest tree of T nodes; the kernel's walk just idles on -1 past the root).
    """
    check_tensor("tree_attention_mask", "parents", parents, 1, INDEX_DTYPES, "[T]", non_empty=True)
    check_tensor("tree_attention_mask", "prefix_lens", prefix_lens, 1, INDEX_DTYPES, "[B]")
    num_nodes = parents.shape[0]
    depth = _tree_depth(parents.tolist()) if values_readable(parents) else num_nodes - 1
    if values_readable(prefix_lens):
        lens = prefix_lens.tolist()
        if any(n < 0 for n in lens):
            raise ValueError(f"tree_attention_mask: prefix_lens must be >= 0, got {lens}")
        needed = max(lens, default=0) + num_nodes
        if max_kv_len is not None and max_kv_len < needed:
            raise ValueError(f"tree_attention_mask: max_kv_len = {max_kv_len} < max(prefix_lens) + T = {needed}")
        return (needed if max_kv_len is None else max_kv_len), depth
    if max_kv_len is None:
        if prefix_lens.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("tree_attention_mask: pass max_kv_len explicitly during CUDA graph capture")
        # The one sync left, and only for callers that leave max_kv_len out: the mask's
        # width depends on the values of prefix_lens, and a shape must be known on the host.
        max_kv_len = int(prefix_lens.max()) + num_nodes if prefix_lens.shape[0] else num_nodes
    return max_kv_len, depth


def _tree_depth(parent_list: list[int]) -> int:
    """The longest root-to-node path (in edges); ValueError unless parents is a valid tree."""
    if parent_list[0] != -1:
        raise ValueError(f"tree_attention_mask: parents[0] must be -1 (node 0 is the root), "
                         f"got {parent_list[0]}")
    depth = [0] * len(parent_list)
    for i in range(1, len(parent_list)):
        if not 0 <= parent_list[i] < i:
            raise ValueError(f"tree_attention_mask: parents[{i}] = {parent_list[i]}, need "
                             f"0 <= parents[i] < i (nodes in topological order)")
        depth[i] = depth[parent_list[i]] + 1
    return max(depth)


def tree_attention_mask_reference(parents: torch.Tensor, prefix_lens: torch.Tensor,
                                  max_kv_len: int | None = None) -> torch.Tensor:
    """PyTorch reference (also the CPU path).

    parents:     [T] int, parents[0] = -1, 0 <= parents[i] < i
    prefix_lens: [B] int, KV entries already cached per sequence
    max_kv_len:  columns of the mask; default and minimum max(prefix_lens) + T
    Returns [B, T, max_kv_len] bool on prefix_lens' device (see the module docstring for an example).
    """
    max_kv_len, _ = _check_inputs(parents, prefix_lens, max_kv_len)
    num_nodes, device = parents.shape[0], prefix_lens.device
    parent_list = parents.tolist()  # the CPU path; on a GPU the dispatcher runs the kernel instead
    # ancestor_or_self[i, a]: a is i or an ancestor of i. Row parents[i] is complete before row i.
    ancestor_or_self = torch.eye(num_nodes, dtype=torch.bool)  # [T, T], built on the host
    for i in range(1, num_nodes):
        ancestor_or_self[i] |= ancestor_or_self[parent_list[i]]
    ancestor_or_self = ancestor_or_self.to(device)

    j = torch.arange(max_kv_len, device=device)  # [max_kv_len]
    rel = j[None, :] - prefix_lens.long()[:, None]  # [B, max_kv_len] tree node of column j if 0 <= rel < T
    in_prefix = rel < 0
    in_tree = (rel >= 0) & (rel < num_nodes)
    tree_visible = ancestor_or_self[:, rel.clamp(0, num_nodes - 1)].permute(1, 0, 2)  # [B, T, max_kv_len]
    return in_prefix[:, None, :] | (in_tree[:, None, :] & tree_visible)


def _tree_mask_kernel(
    parents_ptr, prefix_lens_ptr, mask_ptr,  # [T] int32, [B], [B, T, max_kv_len] uint8
    num_nodes, max_kv_len, max_depth,
    stride_mask_b, stride_mask_i, stride_mask_j,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One program: BLOCK_I query nodes x BLOCK_J kv columns of one sequence.

    Grid (cdiv(max_kv_len, BLOCK_J), cdiv(T, BLOCK_I), B).
    """
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BLOCK_J] kv columns
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I] query nodes
    b = tl.program_id(2)
    i_mask = offs_i < num_nodes
    prefix_len = tl.load(prefix_lens_ptr + b)
    rel = offs_j - prefix_len  # [BLOCK_J] the tree node at column j when 0 <= rel < T

    # Walk every query row up its root path: node = i, parent(i), ..., 0, then -1 for good.
    # E.g. parents [-1, 0, 0, 1], i = 3: node 3 -> 1 -> 0 -> -1, so columns of nodes {3, 1, 0}.
    node = tl.where(i_mask, offs_i, -1)  # [BLOCK_I]
    visible = rel[None, :] == node[:, None]  # [BLOCK_I, BLOCK_J]
    for _ in range(max_depth):
        # (node < num_nodes: parents are not value-checked on a GPU; never read out of bounds)
        node = tl.load(parents_ptr + node, mask=(node >= 0) & (node < num_nodes), other=-1)
        visible = visible | (rel[None, :] == node[:, None])
    # rel == node only matches tree columns (nodes are < T), or node -1 at column prefix_len - 1,
    # which is a prefix column anyway: no separate "is a tree column" test is needed.
    visible = (rel < 0)[None, :] | visible

    ptrs = mask_ptr + b * stride_mask_b + offs_i[:, None] * stride_mask_i + offs_j[None, :] * stride_mask_j
    tl.store(ptrs, visible.to(tl.uint8), mask=i_mask[:, None] & (offs_j < max_kv_len)[None, :])


def tree_attention_mask_triton(parents: torch.Tensor, prefix_lens: torch.Tensor,
                               max_kv_len: int | None = None) -> torch.Tensor:
    """Triton implementation; same arguments and result as tree_attention_mask_reference.

    Builds the mask from `parents` directly: each program walks its query nodes' parent
    chains (depth steps), no ancestor matrix is precomputed.
    No host sync on a GPU when the caller passes max_kv_len (it knows max(prefix_lens) + T
    on the host); parents may then be a CPU tensor (checked for free, its exact depth
    bounds the walk) or a CUDA one (unchecked, the walk takes T - 1 steps).
    """
    max_kv_len, depth = _check_inputs(parents, prefix_lens, max_kv_len)
    check_triton_device("tree_attention_mask_triton", prefix_lens)
    # non_blocking: a host-to-device copy of a few ints need not wait for the GPU's queue.
    parents = parents.to(device=prefix_lens.device, dtype=torch.int32, non_blocking=True).contiguous()
    launch, mask = tree_mask_launch(parents, prefix_lens, max_kv_len, depth)
    if launch is not None:
        launch.run()
    return mask.view(torch.bool)


def tree_mask_launch(parents: torch.Tensor, prefix_lens: torch.Tensor, max_kv_len: int,
                     max_depth: int) -> tuple[KernelLaunch | None, torch.Tensor]:
    """The kernel launch of tree_attention_mask_triton, and its uint8 output [B, T, max_kv_len].

    parents: [T] int32 on prefix_lens' device. Shapes only (meta tensors work, see
    chimera_kernels.launches); returns (None, mask) when the mask is empty.
    """
    num_nodes, batch = parents.shape[0], prefix_lens.shape[0]
    # Stored as uint8 and viewed as bool: same bytes, and no reliance on bool pointers in Triton.
    mask = torch.empty(batch, num_nodes, max_kv_len, dtype=torch.uint8, device=prefix_lens.device)
    if batch == 0 or max_kv_len == 0:
        return None, mask
    block_i = min(16, next_power_of_2(num_nodes))
    block_j = min(128, next_power_of_2(max_kv_len))
    grid = (cdiv(max_kv_len, block_j), cdiv(num_nodes, block_i), batch)
    args = dict(parents_ptr=parents, prefix_lens_ptr=prefix_lens.contiguous(), mask_ptr=mask,
                num_nodes=num_nodes, max_kv_len=max_kv_len, max_depth=max_depth,
                stride_mask_b=mask.stride(0), stride_mask_i=mask.stride(1), stride_mask_j=mask.stride(2))
    return KernelLaunch(_tree_mask_kernel, grid, args, dict(BLOCK_I=block_i, BLOCK_J=block_j)), mask


def tree_attention_mask(parents: torch.Tensor, prefix_lens: torch.Tensor,
                        max_kv_len: int | None = None) -> torch.Tensor:
    """Dispatcher: the Triton kernel for CUDA tensors, the reference otherwise (CHIMERA_KERNELS overrides).

    Only prefix_lens decides the device (the mask is made there); parents may live anywhere.
    """
    if use_triton(prefix_lens):
        return tree_attention_mask_triton(parents, prefix_lens, max_kv_len)
    return tree_attention_mask_reference(parents, prefix_lens, max_kv_len)
