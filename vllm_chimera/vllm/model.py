"""The Chimera draft as a vLLM model (architecture "ChimeraDraftModel").

The same math as `vllm_chimera.model.ChimeraDraftModel`, built from vLLM layers so that
the encoder layer's keys and values live in vLLM's paged KV cache as a layer of their own
(named `model.layers.{num_target_layers}.self_attn.attn`, after the target's layers, as
EAGLE's draft layer is; a deeper encoder's further layers follow as
`model.layers.{num_target_layers + 1}`, ...). The target's embedding table and logits computation are bound by
the proposer after loading; they are not part of this module's weights.

One call of `forward` is one encoder pass over a batch of new positions (rows):
    window_ids     [num_tokens, 3]        (x_{t-1}, x_t, x_{t+1}), the trigram window of row t
                                          (the proposer resolves the packed layout:
                                          chimera_kernels.trigram_window_ids)
    positions      [num_tokens]           t
    hidden_states  [num_tokens, d]        h_t, the target's final-normed hidden states (for a
                                          draft with target_layer_ids: `fuse_target_layers`'
                                          output, h_t enriched by the target's layers)
and returns s [num_tokens, d]. `head_logits` then gives the K heads' logits for the rows
that end each request.

The pass runs in `ChimeraEncoder`, compiled by vLLM the way EAGLE's draft model is
(`support_torch_compile`: one graph, dynamic in num_tokens; on GPU captured in vLLM's
piecewise CUDA graphs). Its inputs are per row, so the graph never depends on the number of
requests and rows vLLM adds as padding (CUDA-graph sizes) change nothing in the real rows;
the packed layout (cu_seqlens, prefix_ids) is resolved into window ids before the call.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from transformers import LlamaConfig

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer

from chimera_kernels import ACTIVATION_FUNCTIONS
from chimera_kernels import trigram_op  # noqa: F401  (registers torch.ops.chimera.*)
from vllm_chimera.config import ChimeraConfig
# The reduced vocabulary's map is a stored id table: vLLM's vocab_mapping.VocabMapping builds
# its map from two tokenizers instead, so the core's to_target_ids serves here too.
from vllm_chimera.model import ResidualHead, to_target_ids

ARCHITECTURE = "ChimeraDraftModel"

# checkpoint name fragment -> (vLLM parameter fragment, shard id): vLLM fuses q/k/v and gate/up.
_STACKED = [(".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"),
            (".v_proj", ".qkv_proj", "v"), (".gate_proj", ".gate_up_proj", 0),
            (".up_proj", ".gate_up_proj", 1)]
# The checkpoint's top-level names that live in ChimeraEncoder (loaded as "encoder.<name>").
_ENCODER_PARTS = ("trigram_w1", "trigram_w2", "fuse", "layer", "extra_layers", "norm")


def _encoder_layer_config(config: ChimeraConfig) -> LlamaConfig:
    """The encoder layer's shape as the LlamaConfig vLLM's Llama layer reads."""
    return LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        hidden_act=config.hidden_act, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})


def _linear(in_features: int, out_features: int, prefix: str) -> ReplicatedLinear:
    return ReplicatedLinear(in_features, out_features, bias=False, return_bias=False, prefix=prefix)


def _head_linear(head_index: int, in_features: int, out_features: int, name: str) -> ReplicatedLinear:
    """The layers of ResidualHead i, named as in the checkpoint (heads.{i}.up, ...)."""
    return _linear(in_features, out_features, f"heads.{head_index}.{name}")


@support_torch_compile(dynamic_arg_dims={"window_ids": 0, "positions": 0, "hidden_states": 0})
class ChimeraEncoder(nn.Module):
    """The encoder pass, s = norm(layers(W_f [u_{t+1}; h_t])), u from the trigram encoder.

    vLLM compiles this module (its forward, traced once, guards dropped) unless the engine
    is eager; the heads run outside it. Every input is per row (num_tokens is the one
    dynamic dimension) and nothing in it reads a value on the host, so on GPU the graph's
    pieces between attention calls are captured in CUDA graphs. The trigram encoder is the
    opaque custom op chimera::trigram_encoder_rows (chimera_kernels.trigram_op): the Triton
    kernel on CUDA, the PyTorch reference on CPU, as in eager mode.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: ChimeraConfig = vllm_config.speculative_config.draft_model_config.hf_config
        self.config = config
        d = config.hidden_size
        if config.use_trigram_encoder:
            # A plain Linear: the fused kernel reads W1 itself, and vLLM's CPU linear
            # method repacks (and empties) the .weight of its own linear layers.
            self.trigram_w1 = nn.Linear(3 * d, d, bias=False)
            self.trigram_w2 = _linear(d, d, "trigram_w2")
            # With tensor parallelism the target's table is vocabulary-sharded: rows are
            # looked up through its layer (an all-reduce) instead of the kernel.
            self.vocab_sharded = get_tensor_model_parallel_world_size() > 1
        self.fuse = _linear((2 if config.use_trigram_encoder else 1) * d, d, "fuse")
        num_target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        # The names hold exactly one integer each: vLLM orders KV layers by it.
        layer_config = _encoder_layer_config(config)
        self.layer = LlamaDecoderLayer(vllm_config, prefix=f"model.layers.{num_target_layers}",
                                       config=layer_config)
        self.extra_layers = nn.ModuleList(  # config.num_encoder_layers - 1 of them
            LlamaDecoderLayer(vllm_config, prefix=f"model.layers.{num_target_layers + i}",
                              config=layer_config)
            for i in range(1, config.num_encoder_layers))
        self.norm = RMSNorm(d, eps=config.rms_norm_eps)

    def bind_embedding(self, embed_tokens: nn.Module) -> None:
        """Share the target's embedding layer (a plain attribute, not a submodule)."""
        self.__dict__["embed_tokens"] = embed_tokens

    def _trigram(self, window_ids: torch.Tensor) -> torch.Tensor:
        """u = W2 act(W1 [E(w_0); E(w_1); E(w_2)]): [N, 3] window ids -> [N, d]."""
        activation = self.config.trigram_activation
        if not self.vocab_sharded:
            u = torch.ops.chimera.trigram_encoder_rows(
                window_ids, self.embed_tokens.weight, self.trigram_w1.weight, activation)
        else:
            rows = self.embed_tokens(window_ids.reshape(-1))  # [3N, d]
            rows = rows.view(window_ids.shape[0], -1)  # [N, 3d]
            u = ACTIVATION_FUNCTIONS[activation](self.trigram_w1(rows))
        return self.trigram_w2(u)

    def forward(self, window_ids: torch.Tensor | None, positions: torch.Tensor,
                hidden_states: torch.Tensor) -> torch.Tensor:
        # window_ids [N, 3] (None without the trigram encoder), positions [N],
        # hidden_states [N, d] -> s [N, d]
        if self.config.use_trigram_encoder:
            u = self._trigram(window_ids)  # [N, d]
            z = self.fuse(torch.cat([u.to(hidden_states.dtype), hidden_states], dim=-1))
        else:
            z = self.fuse(hidden_states)  # [N, d]
        x, residual = self.layer(positions, z, None)  # [N, d] each
        for layer in self.extra_layers:  # (each adds the last one's output to the residual)
            x, residual = layer(positions, x, residual)
        s, _ = self.norm(x, residual)  # norm(x + residual): the last layer's output, normed
        return s


class ChimeraDraftForVLLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: ChimeraConfig = vllm_config.speculative_config.draft_model_config.hf_config
        self.config = config
        d = config.hidden_size
        # The encoder pass (None without the context layer: the Medusa-style ablation).
        self.encoder = (ChimeraEncoder(vllm_config=vllm_config, prefix="encoder")
                        if config.use_context_encoder else None)
        if config.target_layer_ids:  # (vllm_chimera.model.ChimeraDraftModel.fuse_target_layers)
            self.target_layer_norms = nn.ModuleList(
                RMSNorm(d, eps=config.rms_norm_eps) for _ in config.target_layer_ids)
            self.target_layer_fuse = _linear(len(config.target_layer_ids) * d, d, "target_layer_fuse")
        self.heads = nn.ModuleList(
            ResidualHead(d, config.head_intermediate_size, config.sequential_heads,
                         linear=functools.partial(_head_linear, i))
            for i in range(config.num_decoding_heads))
        if config.draft_vocab_size is not None:
            self.draft_lm_head = _linear(d, config.draft_vocab_size, "draft_lm_head")
            self.register_buffer("draft_to_target_ids",
                                 torch.zeros(config.draft_vocab_size, dtype=torch.long))
        else:  # (the ids are target ids: to_target_ids leaves them)
            self.register_buffer("draft_to_target_ids", None)
        self._target = None  # the target language model, set by bind_target (not a submodule)

    def bind_target(self, target: nn.Module) -> None:
        """Share the target's embedding table and logits (LM head + logits processor)."""
        self.__dict__["_target"] = target  # a plain attribute: not in named_parameters()
        if self.encoder is not None:
            self.encoder.bind_embedding(target.model.embed_tokens)

    def fuse_target_layers(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """h_t as a draft with target_layer_ids reads it, from what vLLM's runner hands an
        EAGLE-3-style proposer: the target's residual stream at the layers
        config.eagle_aux_hidden_state_layer_ids (target_layer_ids, then the last layer),
        concatenated: [N, (n + 1) * d] -> [N, d].

        e.g. SmolLM2 (30 layers, d = 576) with target_layer_ids [2, 15, 27]: columns
        0..575 are layer 2's input, .. 1152..1727 layer 27's, 1728..2303 the last layer's
        output before the final norm; h_t = the target's final norm of those.
        """
        *layers, last = aux_hidden_states.split(self.config.hidden_size, dim=-1)
        h = self._target.model.norm(last)  # [N, d]: what the target's LM head read
        normed = torch.cat([norm(layer) for norm, layer in zip(self.target_layer_norms, layers)],
                           dim=-1)  # [N, n * d]
        return h + self.target_layer_fuse(normed)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._target.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden_states: torch.Tensor, inputs_embeds: torch.Tensor | None = None,
                window_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One encoder pass: s [num_tokens, d] (input_ids, inputs_embeds: EAGLE's model
        arguments, unused: the trigram encoder reads window_ids [num_tokens, 3])."""
        if self.encoder is None:  # ablation: heads on h alone
            return torch.zeros_like(hidden_states)
        if not self.config.use_trigram_encoder:
            window_ids = None  # (a compiled graph's None argument stays None)
        return self.encoder(window_ids=window_ids, positions=positions,
                            hidden_states=hidden_states)

    def head_logits(self, hidden_states: torch.Tensor, s: torch.Tensor,
                    num_heads: int) -> torch.Tensor:
        """The first `num_heads` (parallel) heads: [B, d], [B, d] -> [B, num_heads, V (or
        draft V)], in one LM-head call."""
        if num_heads > len(self.heads):
            raise ValueError(f"chimera: {num_heads} head drafts asked of a draft with "
                             f"{len(self.heads)} heads")
        hs = torch.cat([hidden_states, s], dim=-1)
        # h is already final-normed (it is what the target's LM head reads): no second norm.
        residual = torch.stack([hidden_states + self.heads[i](hs) for i in range(num_heads)], dim=1)
        logits = self._lm_logits(residual.flatten(0, 1))  # [B * num_heads, V']
        return logits.view(hidden_states.shape[0], num_heads, -1)

    def head_top_k(self, hidden_states: torch.Tensor, s: torch.Tensor, num_heads: int,
                   top_k: int, next_token_ids: torch.Tensor, return_probs: bool = False):
        """The first `num_heads` heads' top-k drafts as target ids: [B, d] x 2, [B] ->
        [B, num_heads, top_k] (vllm_chimera.model.ChimeraDraftModel.propose, the reference);
        with return_probs also their probabilities under each head's softmax, same shape.

        Sequential heads run one after another from next_token_ids (x_{t+1}), each fed the
        embedding of the top-1 draft of the head before it; its other candidates are its
        alternatives given that chain.
        """
        if not self.config.sequential_heads:
            ids, probs = self._top_k(self.head_logits(hidden_states, s, num_heads), top_k, return_probs)
            ids = to_target_ids(ids, self.draft_to_target_ids)
            return (ids, probs) if return_probs else ids
        hs = torch.cat([hidden_states, s], dim=-1)
        previous, candidates, candidate_probs = next_token_ids.long(), [], []
        for head in self.heads[:num_heads]:
            embeds = self.embed_input_ids(previous).to(hidden_states.dtype)  # [B, d]
            ids, probs = self._top_k(self._lm_logits(hidden_states + head(hs, embeds)), top_k,
                                     return_probs)  # [B, top_k] each
            candidates.append(to_target_ids(ids, self.draft_to_target_ids))
            candidate_probs.append(probs)
            previous = candidates[-1][:, 0]
        ids = torch.stack(candidates, dim=1)
        return (ids, torch.stack(candidate_probs, dim=1)) if return_probs else ids

    @staticmethod
    def _top_k(logits: torch.Tensor, top_k: int, return_probs: bool):
        """[..., V'] -> (top-k indices, their softmax probabilities or None)."""
        if not return_probs:  # (the softmax is not free over a full vocabulary)
            return logits.topk(top_k, dim=-1).indices, None
        top = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
        return top.indices, top.values

    def _lm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [N, V'] the reduced draft LM head, or the target's logits."""
        if self.config.draft_vocab_size is not None:
            return self.draft_lm_head(states)
        return self._target.compute_logits(states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded = set()
        for name, weight in weights:
            if name.split(".", 1)[0] in _ENCODER_PARTS:  # e.g. layer.mlp.* -> encoder.layer.mlp.*
                name = f"encoder.{name}"
            for ckpt_part, param_part, shard_id in _STACKED:
                if ckpt_part in name:
                    name = name.replace(ckpt_part, param_part)
                    params[name].weight_loader(params[name], weight, shard_id)
                    break
            else:
                if name in buffers:
                    buffers[name].copy_(weight)
                else:
                    param = params[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
        return loaded
