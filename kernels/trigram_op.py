"""The trigram encoder as a PyTorch custom op over per-row windows, for compiled callers.

`torch.ops.chimera.trigram_encoder_rows(window_ids, embed_weight, w1, activation)` is
`trigram_encoder` with each row's three token ids given explicitly ([num_rows, 3], as
`trigram_window_ids` returns them) instead of a packed batch (token_ids, cu_seqlens,
prefix_ids). Why a second entry point:

  * torch.compile (vLLM's `support_torch_compile`) traces one graph for every batch, so
    its inputs may vary only along the row dimension: cu_seqlens [num_seqs + 1] and
    prefix_ids [num_seqs, 2] change shape with the number of requests, window ids do not.
    Rows are then independent, so padded rows (vLLM's CUDA-graph sizes) are harmless.
  * As a custom op with a fake (shape-only) implementation, dynamo and inductor treat the
    call as opaque: the Triton kernel (CUDA) or the reference (CPU) runs as it is, the
    one implementation of the trigram math. Neither reads a tensor's values on the host
    on CUDA (see _dispatch.values_readable), so the op can be captured in a CUDA graph.

The trick that reuses the packed kernel unchanged: row r becomes a sequence of its own,
one token long, whose two preceding tokens are given by prefix_ids. With
window_ids = [[a, b, c], [d, e, f]]:
    token_ids  = [c, f]            (column 2, x_t)
    cu_seqlens = [0, 1, 2]         (arange(num_rows + 1): one token per sequence)
    prefix_ids = [[a, b], [d, e]]  (columns 0 and 1, x_{t-2} and x_{t-1})
and trigram_window_ids of that batch gives back [[a, b, c], [d, e, f]]: every id is a real
token (>= 0), so the "before the start" rule never applies.
"""
from __future__ import annotations

import torch

from chimera_kernels.trigram import trigram_encoder

OP_NAME = "chimera::trigram_encoder_rows"


@torch.library.custom_op(OP_NAME, mutates_args=())
def trigram_encoder_rows(window_ids: torch.Tensor, embed_weight: torch.Tensor, w1: torch.Tensor,
                         activation: str) -> torch.Tensor:
    """act(W1 [E(w0); E(w1); E(w2)]) per row: window_ids [num_rows, 3] (int, every id a
    real token), embed_weight [vocab, d], w1 [d_out, 3d] -> [num_rows, d_out] in
    embed_weight's dtype."""
    num_rows = window_ids.shape[0]
    cu_seqlens = torch.arange(num_rows + 1, dtype=torch.int32, device=window_ids.device)
    return trigram_encoder(window_ids[:, 2], cu_seqlens, embed_weight, w1, None, activation,
                           window_ids[:, :2])


@trigram_encoder_rows.register_fake
def _trigram_encoder_rows_fake(window_ids: torch.Tensor, embed_weight: torch.Tensor,
                               w1: torch.Tensor, activation: str) -> torch.Tensor:
    return embed_weight.new_empty(window_ids.shape[0], w1.shape[0])  # [num_rows, d_out]
