"""Triton kernels of vllm-chimera, each with a PyTorch reference and a dispatcher.

    trigram_encoder*      fused trigram encoder of the draft model (gather 3 rows of E, apply W1)
    tree_attention_mask*  attention mask for verifying a static token tree in one target pass

`foo` dispatches to `foo_triton` for CUDA tensors and to `foo_reference` otherwise;
CHIMERA_KERNELS=triton|reference forces one (see _dispatch.py). Importing this package
does not import triton. On a GPU the wrappers read no tensor values (no host sync) unless
CHIMERA_KERNELS_CHECK=1; tree_attention_mask needs max_kv_len for that.

    chimera_kernels.launches  every launch the dispatch code makes for its callers (vLLM, ...)
    chimera_kernels.aot       compiling those for sm_80 / sm_90 without a GPU, with ptxas's spills
"""
from chimera_kernels.tree_mask import (tree_attention_mask, tree_attention_mask_reference,
                                       tree_attention_mask_triton)
from chimera_kernels.trigram import (ACTIVATION_FUNCTIONS, trigram_encoder, trigram_encoder_reference, trigram_encoder_triton,
                                     trigram_window_ids)

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "tree_attention_mask",
    "tree_attention_mask_reference",
    "tree_attention_mask_triton",
    "trigram_encoder",
    "trigram_encoder_reference",
    "trigram_encoder_triton",
    "trigram_window_ids",
]
