"""The Chimera draft model in plain PyTorch (no vLLM).

Reading order, bottom to top of the draft (the Chimera paper, arXiv 2402.15758):

    x_{t-1}, x_t, x_{t+1} --TrigramEncoder--> u_{t+1}                 short-range context
    z_t = W_f [u_{t+1}; h_t]                                            h_t: target's final hidden state
                                     (with target_layer_ids, h_t is first enriched by the target's
                                      intermediate layers: `fuse_target_layers`)
    s_t = norm(EncoderLayer(z_0..z_t))                                  long-range context (causal)
    logits_i = LMHead(h_t + R_i([h_t; s_t]))   for i in 0..K-1          predicts x_{t+2+i}

When the draft runs at position n, the target has just produced h_n and sampled x_{n+1};
the K heads then propose x_{n+2} .. x_{n+1+K} in one pass.

The target's embedding table E and LM head are shared and frozen: the draft does not own
them (they are not in its state dict); `bind_target` hands them over.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chimera_kernels import ACTIVATION_FUNCTIONS, trigram_encoder
from vllm_chimera.config import ChimeraConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does: bf16 variance is too coarse.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin for neox-style RoPE (rotate the two halves), as Llama and vLLM's get_rope.

    positions: [B, L] -> cos, sin: [B, 1, L, head_dim]
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, head_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, L, head_dim]
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerKVCache:
    """Keys and values of one encoder layer for positions already encoded (reference decoder).

    keys, values: [B, num_key_value_heads, num_cached, head_dim]. The draft only ever encodes
    accepted positions, so the cache only grows; it never needs rolling back.
    """
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def num_cached(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, keys: torch.Tensor, values: torch.Tensor):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
        return self.keys, self.values


class DraftKVCache:
    """The encoder's cache: one LayerKVCache per encoder layer (config.num_encoder_layers)."""

    def __init__(self, num_layers: int = 1):
        self.layers = [LayerKVCache() for _ in range(num_layers)]

    @property
    def num_cached(self) -> int:
        return self.layers[0].num_cached


class EncoderAttention(nn.Module):
    def __init__(self, config: ChimeraConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, hd)
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                kv_cache: LayerKVCache | None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is None:  # training: the whole sequence at once
            mask, is_causal = None, True
        else:
            # Query i sits at cache index num_cached + i and sees keys 0 .. num_cached + i.
            # e.g. num_cached=3, L=2: row 0 sees keys 0..3, row 1 sees keys 0..4.
            num_cached = kv_cache.num_cached
            k, v = kv_cache.append(k, v)
            mask = torch.ones(L, k.shape[-2], dtype=torch.bool, device=x.device).tril(num_cached)
            is_causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            enable_gqa=self.num_heads != self.num_kv_heads)  # [B, num_heads, L, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class GatedMLP(nn.Module):
    def __init__(self, config: ChimeraConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act = ACTIVATION_FUNCTIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    """One pre-norm Llama decoder layer: the full-context encoder.

    Parameter names follow Hugging Face's LlamaDecoderLayer, so vLLM's Llama layer loads
    them with its usual q/k/v and gate/up stacking.
    """

    def __init__(self, config: ChimeraConfig):
        super().__init__()
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.self_attn = EncoderAttention(config)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x, positions, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _plain_linear(in_features: int, out_features: int, name: str) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


class ResidualHead(nn.Module):
    """R_i: [h; s] (2d) -> d. Its output layer starts at zero, so an untrained head
    returns h itself and predicts what the target's LM head predicts from h.

    A sequential head (config.sequential_heads) also reads e, the target's embedding of the
    token before its own target: R_i = down(silu(up([h; s]) + token_up(e))).

    `linear(in_features, out_features, name)` builds its bias-free layers ("up", "token_up",
    "down"): plain nn.Linear here, vLLM's linear layers in vllm/model.py (the same head).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, sequential: bool = False,
                 linear=_plain_linear):
        super().__init__()
        self.up = linear(2 * hidden_size, intermediate_size, "up")
        self.token_up = linear(hidden_size, intermediate_size, "token_up") if sequential else None
        self.down = linear(intermediate_size, hidden_size, "down")
        nn.init.zeros_(self.down.weight)

    def forward(self, hs: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """hs [..., 2d] (and token_embeds [..., d] for a sequential head) -> [..., d]."""
        x = self.up(hs)
        if self.token_up is not None:
            x = x + self.token_up(token_embeds)
        return self.down(F.silu(x))


def to_target_ids(draft_ids: torch.Tensor, draft_to_target_ids: torch.Tensor | None) -> torch.Tensor:
    """Indices into a draft's logits -> target token ids, any shape.

    draft_to_target_ids [V']: the target id of each id of a reduced draft vocabulary; None
    for a draft that predicts over the target's whole vocabulary (the ids are target ids).
    """
    if draft_to_target_ids is None:
        return draft_ids
    return draft_to_target_ids.to(draft_ids.device)[draft_ids]


class ChimeraDraftModel(nn.Module):
    def __init__(self, config: ChimeraConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        if config.use_context_encoder:
            if config.use_trigram_encoder:
                self.trigram_w1 = nn.Linear(3 * d, d, bias=False)  # [E(x_{t-2}); E(x_{t-1}); E(x_t)] -> d
                self.trigram_w2 = nn.Linear(d, d, bias=False)
            # W_f: [u_{t+1}; h_t] -> z_t  (h_t -> z_t without the trigram encoder)
            self.fuse = nn.Linear((2 if config.use_trigram_encoder else 1) * d, d, bias=False)
            self.layer = EncoderLayer(config)
            # A deeper encoder (config.num_encoder_layers > 1): more layers over the same
            # fused sequence, before the one final norm.
            self.extra_layers = nn.ModuleList(
                EncoderLayer(config) for _ in range(config.num_encoder_layers - 1))
            self.norm = RMSNorm(d, config.rms_norm_eps)
        self.heads = nn.ModuleList(
            ResidualHead(d, config.head_intermediate_size, config.sequential_heads)
            for _ in range(config.num_decoding_heads))
        if config.target_layer_ids:
            # EAGLE-3's richer inputs: each layer's residual stream normed (their scales
            # differ by orders of magnitude), then projected; W_l starts at zero, so the
            # draft starts as the design without them (and a saved draft grows into one).
            num_layers = len(config.target_layer_ids)
            self.target_layer_norms = nn.ModuleList(
                RMSNorm(d, config.rms_norm_eps) for _ in range(num_layers))
            self.target_layer_fuse = nn.Linear(num_layers * d, d, bias=False)
        if config.draft_vocab_size is not None:
            # Reduced draft vocabulary: a smaller LM head of its own (initialised from the
            # target's rows) and the map back to target ids.
            self.draft_lm_head = nn.Linear(d, config.draft_vocab_size, bias=False)
            self.register_buffer("draft_to_target_ids",
                                 torch.arange(config.draft_vocab_size, dtype=torch.long))
        else:  # (the ids are target ids: to_target_ids leaves them)
            self.register_buffer("draft_to_target_ids", None)
        self._init_weights()
        self._target_embed: torch.Tensor | None = None  # [V, d], the target's, not ours
        self._target_lm_head: torch.Tensor | None = None  # [V, d]

    def _init_weights(self):
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear) and not isinstance(module, ResidualHead):
                nn.init.normal_(module.weight, std=std)
        for head in self.heads:  # undo the normal init above for the zero-start output layers
            nn.init.zeros_(head.down.weight)
        if self.config.target_layer_ids:
            nn.init.zeros_(self.target_layer_fuse.weight)

    # -- the target's shared, frozen parts ---------------------------------------------
    def bind_target(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                    frequent_token_ids: torch.Tensor | None = None) -> "ChimeraDraftModel":
        """Hand over the target's embedding table and LM head weight (both [V, d]).

        They are kept as plain tensors, outside the draft's parameters and state dict.
        With a reduced vocabulary, `frequent_token_ids` ([draft_vocab_size] target ids)
        initialises the draft LM head and the id map (training does this once; a loaded
        checkpoint already carries both).
        """
        V, d = self.config.vocab_size, self.config.hidden_size
        for name, w in (("embedding", embed_weight), ("LM head", lm_head_weight)):
            if tuple(w.shape) != (V, d):
                raise ValueError(f"target {name} has shape {tuple(w.shape)}, the draft expects "
                                 f"[vocab_size={V}, hidden_size={d}]")
        self._target_embed = embed_weight.detach()
        self._target_lm_head = lm_head_weight.detach()
        if frequent_token_ids is not None:
            if self.config.draft_vocab_size is None:
                raise ValueError("frequent_token_ids given but the config has no draft_vocab_size")
            with torch.no_grad():
                self.draft_to_target_ids.copy_(frequent_token_ids)
                self.draft_lm_head.weight.copy_(lm_head_weight[frequent_token_ids])
        return self

    def _require_target(self):
        if self._target_embed is None:
            raise RuntimeError("ChimeraDraftModel.bind_target(...) must be called before use")

    # -- the forward pieces ------------------------------------------------------------
    def fuse_target_layers(self, hidden_states: torch.Tensor,
                           layer_states: torch.Tensor | None) -> torch.Tensor:
        """h_t as the draft reads it: with config.target_layer_ids, enriched by the target's
        residual stream at those layers, h_t + W_l [norm_1(l_1); ..; norm_n(l_n)]; without,
        h_t itself. Everything downstream (z_t, the heads' [h; s] and residual) reads this.

        hidden_states [..., d], layer_states [..., n * d] (None without layers) -> [..., d]
        """
        if not self.config.target_layer_ids:
            if layer_states is not None:
                raise ValueError("layer_states given to a draft without target_layer_ids")
            return hidden_states
        if layer_states is None:
            raise ValueError(f"this draft reads the target's layers {self.config.target_layer_ids}: "
                             "pass their states (layer_states)")
        chunks = layer_states.split(self.config.hidden_size, dim=-1)  # n x [..., d]
        normed = torch.cat([norm(chunk.to(hidden_states.dtype))
                            for norm, chunk in zip(self.target_layer_norms, chunks)], dim=-1)
        return hidden_states + self.target_layer_fuse(normed)

    def encode(self, next_token_ids: torch.Tensor, hidden_states: torch.Tensor,
               positions: torch.Tensor, prefix_ids: torch.Tensor,
               kv_cache: DraftKVCache | None = None) -> torch.Tensor:
        """Run trigram encoder, fusion and the encoder layer(s) over a chunk of positions.

        For positions t = t0 .. t0+L-1 of each of B sequences:
            next_token_ids: [B, L]     x_{t+1} (the inputs shifted by one, as in EAGLE)
            hidden_states:  [B, L, d]  h_t
            positions:      [B, L]     t
            prefix_ids:     [B, 2]     (x_{t0-1}, x_{t0}), -1 where before the sequence start;
                                       a chunk that starts at t0 = 0 passes (-1, x_0), so
                                       u_1 = f(x_0, x_0, x_1) (tokens before the
                                       start repeat x_0).
            kv_cache:       the encoder's cache for positions < t0 (one LayerKVCache per
                            encoder layer), or None to encode whole sequences causally
                            (training).
        Returns s: [B, L, d].
        """
        self._require_target()
        if not self.config.use_context_encoder:  # ablation: Medusa-style heads on h alone
            return torch.zeros_like(hidden_states)
        if self.config.use_trigram_encoder:
            u = self.trigram_features(next_token_ids, prefix_ids).to(hidden_states.dtype)
            z = self.fuse(torch.cat([u, hidden_states], dim=-1))  # [B, L, d]
        else:
            z = self.fuse(hidden_states)
        layers = [self.layer, *self.extra_layers]
        if kv_cache is not None and len(kv_cache.layers) != len(layers):
            raise ValueError(f"kv_cache has {len(kv_cache.layers)} layers, the encoder "
                             f"{len(layers)} (DraftKVCache(config.num_encoder_layers))")
        for i, layer in enumerate(layers):
            z = layer(z, positions, None if kv_cache is None else kv_cache.layers[i])
        return self.norm(z)

    def trigram_features(self, next_token_ids: torch.Tensor, prefix_ids: torch.Tensor) -> torch.Tensor:
        """u for each token of a [B, L] chunk (see `encode`): [B, L, d]."""
        B, L = next_token_ids.shape
        # Each row is one sequence of the packed batch the trigram kernel expects.
        cu_seqlens = torch.arange(0, B * L + 1, L, device=next_token_ids.device, dtype=torch.int32)
        u = trigram_encoder(next_token_ids.reshape(-1), cu_seqlens, self._target_embed,
                            self.trigram_w1.weight, None, self.config.trigram_activation,
                            prefix_ids)  # [B * L, d]
        return self.trigram_w2(u).view(B, L, -1)

    def head_logits(self, hidden_states: torch.Tensor, s: torch.Tensor,
                    previous_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logits_i = LMHead(h + R_i([h; s])) for every head.

        hidden_states, s: [..., d] -> [K, ..., V] (or [K, ..., draft_vocab_size])
        """
        return self.lm_logits(self.head_states(hidden_states, s, previous_token_ids))

    def head_states(self, hidden_states: torch.Tensor, s: torch.Tensor,
                    previous_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What each head feeds its LM head, h + R_i([h; s]): [..., d] -> [K, ..., d] (the
        counterpart of the target's h_{t+1+i}: training may regress it onto that).

        Sequential heads also need previous_token_ids [K, ...]: for head i the target id of
        x_{t+1+i}, the token before the one it predicts (x_{t+1} for head 0, then what head
        i-1 drafted, or in training its label).
        """
        self._require_target()
        if self.config.sequential_heads != (previous_token_ids is not None):
            raise ValueError("previous_token_ids are needed by sequential heads and only by them "
                             f"(config.sequential_heads={self.config.sequential_heads})")
        hs = torch.cat([hidden_states, s], dim=-1)
        # h is already final-normed (it is what the target's LM head reads): no second norm.
        return torch.stack([self._head_state(head, hidden_states, hs,
                                             None if previous_token_ids is None else previous_token_ids[i])
                            for i, head in enumerate(self.heads)])

    def _head_state(self, head: ResidualHead, hidden_states: torch.Tensor, hs: torch.Tensor,
                    previous_token_ids: torch.Tensor | None) -> torch.Tensor:
        """h + R_i([h; s]) (+ the embedding of previous_token_ids for a sequential head): [..., d]."""
        embeds = None if previous_token_ids is None else \
            self._target_embed[previous_token_ids].to(hidden_states.dtype)  # [..., d]
        return hidden_states + head(hs, embeds)

    def lm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The draft's LM head: [..., d] -> [..., V] (or [..., draft_vocab_size])."""
        if self.config.draft_vocab_size is not None:
            return self.draft_lm_head(states)
        return states @ self._target_lm_head.t().to(states.dtype)

    def propose(self, hidden_states: torch.Tensor, s: torch.Tensor, top_k: int = 1,
                next_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k draft tokens per head as target ids: [..., d] -> [K, ..., top_k].

        Sequential heads run one after another from next_token_ids [...] (x_{t+1}), each
        fed the top-1 token of the head before it: a chain, and each head's other
        candidates are its alternatives given that chain.
        """
        if not self.config.sequential_heads:
            logits = self.head_logits(hidden_states, s)
            return to_target_ids(logits.topk(top_k, dim=-1).indices, self.draft_to_target_ids)
        if next_token_ids is None:
            raise ValueError("sequential heads need next_token_ids (x_{t+1}) to propose")
        self._require_target()
        hs = torch.cat([hidden_states, s], dim=-1)
        previous, candidates = next_token_ids, []
        for head in self.heads:
            state = self._head_state(head, hidden_states, hs, previous)
            top = to_target_ids(self.lm_logits(state).topk(top_k, dim=-1).indices,
                                self.draft_to_target_ids)  # [..., top_k]
            candidates.append(top)
            previous = top[..., 0]
        return torch.stack(candidates)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def confident_lengths(top1_probs: torch.Tensor, min_confidence: float) -> torch.Tensor:
    """How many leading heads to draft: [num_rows, K] top-1 probabilities -> [num_rows].

    A chain keeps head i while the product of the heads' top-1 probabilities up to i is at
    least min_confidence (the product only falls, so that is a count); head 0 always drafts.
    e.g. probabilities [[0.9, 0.5, 0.8], [0.3, 0.9, 0.9]] at 0.4: products [[0.9, 0.45,
    0.36], [0.3, 0.27, 0.24]] -> lengths [2, 1].
    """
    confident = top1_probs.float().cumprod(dim=1) >= min_confidence  # [num_rows, K]
    return confident.sum(dim=1).clamp(min=1)
