"""Fused trigram encoder: out_t = act(W1 · [E(x_{t-2}); E(x_{t-1}); E(x_t)] + b).

The bottom layer of the Chimera draft model (arXiv 2402.15758; ChimeraDraftModel in
vllm_chimera/model.py, docs/architecture.md).
W1 is an nn.Linear(3d, d_out) weight, [d_out, 3d]: column block 0 multiplies E(x_{t-2}),
block 1 E(x_{t-1}), block 2 E(x_t). The Triton kernel gathers the three embedding rows
and accumulates the three [d] x [d, d_out] block products in fp32, so the [N, 3d]
concatenation the reference builds is never materialised.

Inputs are packed batches: `token_ids` holds several sequences back to back and
`cu_seqlens` their cumulative lengths, as in varlen attention. Trigram windows never
cross a sequence boundary; what precedes a sequence is given by `prefix_ids` (see
`trigram_window_ids` for the rule and a worked example).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chimera_kernels._dispatch import (FLOAT_DTYPES, INDEX_DTYPES, KernelLaunch, cdiv, check_tensor,
                                       check_triton_device, interpreting, needs_grad, next_power_of_2,
                                       use_triton, values_readable)

tl = None  # triton.language, bound on first use by jit_kernel (importing this module never imports triton)

# gelu is the tanh approximation, as in vllm_chimera.model (the Triton epilogue uses the same formula).
# The one table of activations: the draft model's config and layers use it too.
ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "identity": lambda x: x,
}
_ACTIVATIONS = ACTIVATION_FUNCTIONS
ACTIVATIONS = tuple(ACTIVATION_FUNCTIONS)


def trigram_window_ids(token_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The token ids (x_{t-2}, x_{t-1}, x_t) of every position of a packed batch.

    Sequence b (tokens x_0..x_{L-1}) is conceptually extended to [p0, p1, x_0, ..., x_{L-1}]
    with (p0, p1) = prefix_ids[b], the two tokens that precede the chunk (a chunk can be
    the continuation of a longer sequence, as in vLLM decode steps). An entry < 0 means
    "before the real start of the sequence"; every unknown entry takes the FIRST KNOWN
    token of the extended sequence (p0 if p0 >= 0, else p1 if p1 >= 0, else x_0). Without
    prefix_ids every sequence starts at its real start ("tokens before the start repeat x_0").

    Worked example: token_ids = [10, 11, 12, 20, 30, 31], cu_seqlens = [0, 3, 4, 6]
    (sequences [10, 11, 12], [20], [30, 31]):
        prefix_ids=None                        -> [[10, 10, 10], [10, 10, 11], [10, 11, 12],
                                                   [20, 20, 20],
                                                   [30, 30, 30], [30, 30, 31]]
        prefix_ids=[[-1, -1], [5, 6], [-1, 7]]  -> extended sequences [10, 10, 10, 11, 12],
                                                   [5, 6, 20], [7, 7, 30, 31]:
                                                  [[10, 10, 10], [10, 10, 11], [10, 11, 12],
                                                   [5, 6, 20],
                                                   [7, 7, 30], [7, 30, 31]]

    token_ids: [num_tokens]; cu_seqlens: [num_seqs + 1]; prefix_ids: [num_seqs, 2] or None.
    Returns [num_tokens, 3] int64 (column 0 is x_{t-2}).
    """
    num_tokens = token_ids.shape[0]
    x = token_ids.long()  # [num_tokens]
    cu = cu_seqlens.long().contiguous()  # [num_seqs + 1]
    t = torch.arange(num_tokens, device=x.device)  # [num_tokens]
    # Sequence of each token = how many sequences end at or before it (empty ones included).
    seq = torch.searchsorted(cu[1:], t, right=True)  # [num_tokens]
    start = cu[seq]  # [num_tokens]
    pos = t - start  # [num_tokens] position inside its sequence
    x0 = x[start]  # [num_tokens]
    if prefix_ids is None:
        p0 = p1 = torch.full_like(x, -1)
    else:
        p0, p1 = prefix_ids.long()[seq].unbind(1)  # [num_tokens] each
    first_known = torch.where(p0 >= 0, p0, torch.where(p1 >= 0, p1, x0))
    p0 = torch.where(p0 >= 0, p0, first_known)
    p1 = torch.where(p1 >= 0, p1, first_known)
    # clamp: the gathers at t-1 / t-2 are only used where pos says they are in the sequence.
    x_prev1 = torch.where(pos >= 1, x[(t - 1).clamp(min=0)], p1)
    x_prev2 = torch.where(pos >= 2, x[(t - 2).clamp(min=0)], torch.where(pos == 1, p1, p0))
    return torch.stack([x_prev2, x_prev1, x], dim=1)


def _check_inputs(token_ids, cu_seqlens, embed_weight, w1, bias, activation, prefix_ids) -> None:
    """Raise ValueError with a clear message for anything the kernel cannot handle."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"trigram_encoder: unknown activation {activation!r}, "
                         f"expected one of {ACTIVATIONS}")
    check_tensor("trigram_encoder", "token_ids", token_ids, 1, INDEX_DTYPES, "[num_tokens]")
    check_tensor("trigram_encoder", "cu_seqlens", cu_seqlens, 1, INDEX_DTYPES, "[num_seqs + 1]",
                 non_empty=True)
    check_tensor("trigram_encoder", "embed_weight", embed_weight, 2, FLOAT_DTYPES, "[vocab, d]")
    d = embed_weight.shape[1]
    if w1.dim() != 2 or w1.shape[1] != 3 * d:
        raise ValueError(f"trigram_encoder: w1 must be [d_out, 3 * d] = [d_out, {3 * d}] for embedding "
                         f"dim d = {d}, got shape {tuple(w1.shape)}")
    if w1.dtype != embed_weight.dtype:
        raise ValueError(f"trigram_encoder: w1 dtype {w1.dtype} != embed_weight dtype {embed_weight.dtype}")
    if bias is not None and (bias.shape != (w1.shape[0],) or bias.dtype != embed_weight.dtype):
        raise ValueError(f"trigram_encoder: bias must be [{w1.shape[0]}] {embed_weight.dtype}, "
                         f"got {bias.dtype} of shape {tuple(bias.shape)}")
    num_seqs = cu_seqlens.shape[0] - 1
    bad_prefix = prefix_ids is not None and (prefix_ids.shape != (num_seqs, 2)
                                             or prefix_ids.dtype not in INDEX_DTYPES)
    if bad_prefix:
        raise ValueError(f"trigram_encoder: prefix_ids must be an int32/int64 tensor [num_seqs, 2] = "
                         f"[{num_seqs}, 2], got {prefix_ids.dtype} of shape {tuple(prefix_ids.shape)}")
    # Value checks: free on CPU; on CUDA only with CHIMERA_KERNELS_CHECK=1, as they would
    # cost one device-to-host copy (a stall) per call (see values_readable).
    if not values_readable(token_ids, cu_seqlens, prefix_ids):
        return
    vocab = embed_weight.shape[0]
    checks = {
        f"cu_seqlens[0] must be 0 and cu_seqlens[-1] must be num_tokens = {token_ids.shape[0]}":
            (cu_seqlens[0] == 0) & (cu_seqlens[-1] == token_ids.shape[0]),
        "cu_seqlens must be non-decreasing": (cu_seqlens.diff() >= 0).all(),
        f"token_ids must be in [0, vocab = {vocab})": ((token_ids >= 0) & (token_ids < vocab)).all(),
    }
    if prefix_ids is not None:
        checks[f"prefix_ids must be < vocab = {vocab} (entries < 0 mean 'before the start')"] = \
            (prefix_ids < vocab).all()
    ok = torch.stack([c.to(cu_seqlens.device) for c in checks.values()]).tolist()
    for message, passed in zip(checks, ok):
        if not passed:
            raise ValueError(f"trigram_encoder: {message}")


def trigram_encoder_reference(token_ids: torch.Tensor, cu_seqlens: torch.Tensor, embed_weight: torch.Tensor,
                              w1: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "silu",
                              prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference (also the CPU path).

    token_ids:    [num_tokens] int, sequences packed back to back
    cu_seqlens:   [num_seqs + 1] int, cu_seqlens[0] = 0, cu_seqlens[-1] = num_tokens
    embed_weight: [vocab, d]
    w1:           [d_out, 3 * d] (nn.Linear(3d, d_out).weight), same dtype as embed_weight
    bias:         [d_out] or None
    activation:   "silu" | "gelu" (tanh approximation) | "relu" | "identity"
    prefix_ids:   [num_seqs, 2] int or None, see trigram_window_ids
    Returns [num_tokens, d_out] in embed_weight's dtype.
    """
    _check_inputs(token_ids, cu_seqlens, embed_weight, w1, bias, activation, prefix_ids)
    window = trigram_window_ids(token_ids, cu_seqlens, prefix_ids)  # [num_tokens, 3]
    x = F.embedding(window, embed_weight).flatten(1)  # [num_tokens, 3 * d]
    h = F.linear(x, w1, bias)  # [num_tokens, d_out]
    # The activation runs in fp32 like the kernel's epilogue; only the matmul output is rounded.
    return _ACTIVATIONS[activation](h.float()).to(embed_weight.dtype)


def _trigram_kernel(
    token_ids_ptr,  # [num_tokens]
    seq_idx_ptr,  # [num_tokens] int32, sequence of each token
    cu_seqlens_ptr,  # [num_seqs + 1]
    prefix_ptr,  # [num_seqs, 2]
    embed_ptr,  # [vocab, d]
    w1_ptr,  # [d_out, 3 * d]
    bias_ptr,  # [d_out]
    out_ptr,  # [num_tokens, d_out]
    num_tokens, d, d_out,
    stride_tok, stride_prefix_seq, stride_prefix_col,
    stride_embed_row, stride_embed_col, stride_w1_row, stride_w1_col,
    stride_bias, stride_out_row, stride_out_col,
    HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_M tokens x BLOCK_N output features.

    Grid (cdiv(num_tokens, BLOCK_M), cdiv(d_out, BLOCK_N)).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] token rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    m_mask = offs_m < num_tokens
    n_mask = offs_n < d_out

    # The three source tokens of each row; same rule (and example) as trigram_window_ids.
    seq = tl.load(seq_idx_ptr + offs_m, mask=m_mask, other=0)
    start = tl.load(cu_seqlens_ptr + seq, mask=m_mask, other=0)
    pos = offs_m - start  # position inside the sequence
    x_t = tl.load(token_ids_ptr + offs_m * stride_tok, mask=m_mask, other=0).to(tl.int64)
    x_0 = tl.load(token_ids_ptr + start * stride_tok, mask=m_mask, other=0).to(tl.int64)
    if HAS_PREFIX:
        p0 = tl.load(prefix_ptr + seq * stride_prefix_seq, mask=m_mask, other=-1).to(tl.int64)
        p1 = tl.load(prefix_ptr + seq * stride_prefix_seq + stride_prefix_col,
                     mask=m_mask, other=-1).to(tl.int64)
    else:
        p0 = tl.full([BLOCK_M], -1, tl.int64)
        p1 = tl.full([BLOCK_M], -1, tl.int64)
    first_known = tl.where(p0 >= 0, p0, tl.where(p1 >= 0, p1, x_0))
    p0 = tl.where(p0 >= 0, p0, first_known)
    p1 = tl.where(p1 >= 0, p1, first_known)
    # Tokens t-1 and t-2 are read only when they are in the same sequence (pos says so).
    x_prev1 = tl.load(token_ids_ptr + (offs_m - 1) * stride_tok, mask=m_mask & (pos >= 1), other=0)
    x_prev1 = tl.where(pos >= 1, x_prev1.to(tl.int64), p1)
    x_prev2 = tl.load(token_ids_ptr + (offs_m - 2) * stride_tok, mask=m_mask & (pos >= 2), other=0)
    x_prev2 = tl.where(pos >= 2, x_prev2.to(tl.int64), tl.where(pos == 1, p1, p0))

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for block in tl.static_range(3):  # W1 column block 0 multiplies E(x_{t-2}), 1 E(x_{t-1}), 2 E(x_t)
        x = tl.where(block == 0, x_prev2, tl.where(block == 1, x_prev1, x_t))  # [BLOCK_M]
        e_rows = embed_ptr + x[:, None] * stride_embed_row  # [BLOCK_M, 1]; int64 x: vocab * d may be > 2^31
        w_cols = w1_ptr + offs_n[None, :] * stride_w1_row + block * d * stride_w1_col  # [1, BLOCK_N]
        for k_start in range(0, d, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K] embedding dims
            k_mask = offs_k < d
            e = tl.load(e_rows + offs_k[None, :] * stride_embed_col,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            # W1 read transposed: w[k, n] = W1[n, block * d + k], [BLOCK_K, BLOCK_N].
            w = tl.load(w_cols + offs_k[:, None] * stride_w1_col,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_IN_FP32:  # the interpreter would multiply bf16 tiles as their raw uint16 bits
                e = e.to(tl.float32)
                w = w.to(tl.float32)
            # "ieee": fp32 inputs must not silently drop to TF32; bf16/fp16 are unaffected.
            acc = tl.dot(e, w, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # Sigmoids are spelled out: see "builtins only" in _dispatch.py.
    if ACTIVATION == "silu":
        acc = acc / (1.0 + tl.exp(-acc))
    elif ACTIVATION == "gelu":  # tanh approximation: 0.5 x (1 + tanh(y)) = x * sigmoid(2y)
        # y = sqrt(2 / pi) * (x + 0.044715 x^3)
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * inner))
    elif ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out_row + offs_n[None, :] * stride_out_col
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def trigram_encoder_triton(token_ids: torch.Tensor, cu_seqlens: torch.Tensor, embed_weight: torch.Tensor,
                           w1: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "silu",
                           prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Triton implementation; same arguments and result as trigram_encoder_reference.

    Any strides work for token_ids, embed_weight, w1, bias and prefix_ids (they are passed
    to the kernel). fp32 products are exact IEEE fp32 (no TF32); accumulation is fp32.
    Forward only: raises if autograd needs gradients (the dispatcher then uses the reference).
    """
    _check_inputs(token_ids, cu_seqlens, embed_weight, w1, bias, activation, prefix_ids)
    if needs_grad(embed_weight, w1, bias):
        raise RuntimeError("trigram_encoder_triton has no backward; call it under torch.no_grad() or "
                           "use trigram_encoder_reference (trigram_encoder does so unless "
                           "CHIMERA_KERNELS=triton)")
    check_triton_device("trigram_encoder_triton", token_ids, cu_seqlens, embed_weight, w1, bias,
                        prefix_ids)
    launch, out = trigram_launch(token_ids, cu_seqlens, embed_weight, w1, bias, activation, prefix_ids)
    if launch is not None:
        launch.run()
    return out


def trigram_launch(token_ids: torch.Tensor, cu_seqlens: torch.Tensor, embed_weight: torch.Tensor,
                   w1: torch.Tensor, bias: torch.Tensor | None, activation: str,
                   prefix_ids: torch.Tensor | None) -> tuple[KernelLaunch | None, torch.Tensor]:
    """The kernel launch of trigram_encoder_triton on these (checked) inputs, and its output.

    Shapes, strides and dtypes only: no value is read, so nothing here waits for the GPU,
    and meta tensors work (chimera_kernels.launches enumerates launches that way).
    Returns (None, out) when there is nothing to compute.
    """
    num_tokens, (d_out, d) = token_ids.shape[0], (w1.shape[0], embed_weight.shape[1])
    # [num_tokens, d_out]
    out = torch.empty(num_tokens, d_out, dtype=embed_weight.dtype, device=embed_weight.device)
    if num_tokens == 0 or d_out == 0:
        return None, out
    cu = cu_seqlens.contiguous()  # [num_seqs + 1]
    # Sequence of each token, computed with torch before the launch (no device sync):
    # e.g. cu_seqlens [0, 3, 4, 6] -> seq_idx [0, 0, 0, 1, 2, 2].
    positions = torch.arange(num_tokens, device=cu.device, dtype=cu.dtype)
    seq_idx = torch.searchsorted(cu[1:], positions, right=True).to(torch.int32)  # [num_tokens]
    # Small decode batches use small row tiles; tl.dot needs every block dim >= 16.
    block_m = 16 if num_tokens <= 16 else (32 if num_tokens <= 256 else 64)
    block_n = min(64, max(16, next_power_of_2(d_out)))
    block_k = min(64, max(16, next_power_of_2(d)))
    prefix = prefix_ids if prefix_ids is not None else seq_idx  # dummy pointer, never read
    args = dict(
        token_ids_ptr=token_ids, seq_idx_ptr=seq_idx, cu_seqlens_ptr=cu, prefix_ptr=prefix,
        embed_ptr=embed_weight, w1_ptr=w1,
        bias_ptr=bias if bias is not None else out,  # out: dummy bias pointer, never read
        out_ptr=out, num_tokens=num_tokens, d=d, d_out=d_out,
        stride_tok=token_ids.stride(0), stride_prefix_seq=prefix.stride(0),
        stride_prefix_col=prefix.stride(-1),
        stride_embed_row=embed_weight.stride(0), stride_embed_col=embed_weight.stride(1),
        stride_w1_row=w1.stride(0), stride_w1_col=w1.stride(1),
        stride_bias=bias.stride(0) if bias is not None else 0,
        stride_out_row=out.stride(0), stride_out_col=out.stride(1))
    # Meta tensors describe a compiled (GPU) launch, where bf16 tiles go to tl.dot as they are.
    interpreted = not embed_weight.is_meta and interpreting()
    constexprs = dict(
        HAS_PREFIX=prefix_ids is not None, HAS_BIAS=bias is not None, ACTIVATION=activation,
        DOT_IN_FP32=interpreted and embed_weight.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    grid = (cdiv(num_tokens, block_m), cdiv(d_out, block_n))
    return KernelLaunch(_trigram_kernel, grid, args, constexprs), out


def trigram_encoder(token_ids: torch.Tensor, cu_seqlens: torch.Tensor, embed_weight: torch.Tensor,
                    w1: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "silu",
                    prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: Triton kernel for CUDA tensors, reference otherwise (CHIMERA_KERNELS overrides).

    Also the reference when autograd needs gradients through W1 / E / b (the kernel is forward-only).
    """
    if use_triton(token_ids, cu_seqlens, embed_weight, w1, bias, prefix_ids):
        return trigram_encoder_triton(token_ids, cu_seqlens, embed_weight, w1, bias, activation, prefix_ids)
    return trigram_encoder_reference(token_ids, cu_seqlens, embed_weight, w1, bias, activation, prefix_ids)
