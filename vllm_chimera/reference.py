"""A reference speculative decoder on Hugging Face transformers (no vLLM): the oracle.

Batch size 1, readable rather than fast. One step:

    1. the drafter proposes top-k candidates per head from the newest hidden states;
    2. the tree's nodes (root = the last token the target produced) go through the target
       in ONE pass with a tree attention mask, at positions prefix_len + depth;
    3. an acceptance rule (verify.py) keeps a path and adds the target's bonus token;
    4. the target's KV cache keeps only the prefix and the accepted path's entries.

A chain is the tree of one path, so chain and tree share every line of this loop.
Greedy output equals `generate_plain`'s token for token; sampled output has the target's
distribution (tests/test_reference_decoder.py checks both).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from chimera_kernels import tree_attention_mask
from vllm_chimera.model import ChimeraDraftModel, DraftKVCache
from vllm_chimera.target_layers import capture_layer_inputs
from vllm_chimera.tree import TokenTree
from vllm_chimera.verify import accept_greedy, accept_sampling


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens only
    accept_lengths: list[int] = field(default_factory=list)  # tokens per target step (bonus incl.)

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)


class Drafter(Protocol):
    def reset(self) -> None: ...

    def propose(self, token_ids: torch.Tensor, new_hidden_states: torch.Tensor,
                top_k: int) -> torch.Tensor:
        """token_ids: [n + 2] all tokens so far (x_0 .. x_{n+1}); new_hidden_states: [M, d]
        the target's h for positions n-M+1 .. n, not seen by the drafter before.
        Returns [num_heads, top_k] candidate target ids, best first.
        A drafter with a `target_layer_ids` attribute (not None) is also passed
        new_layer_states=[M, n * d]: the target's layer inputs at those positions."""
        ...


class ChimeraDrafter:
    """The Chimera draft as a Drafter: one encoder pass over the new positions, then heads."""

    def __init__(self, model: ChimeraDraftModel):
        self.model = model
        self.kv_cache = DraftKVCache(model.config.num_encoder_layers)
        self.target_layer_ids = model.config.target_layer_ids  # None: h_t alone

    def reset(self) -> None:
        self.kv_cache = DraftKVCache(self.model.config.num_encoder_layers)

    @torch.no_grad()
    def propose(self, token_ids, new_hidden_states, top_k, new_layer_states=None):
        n = token_ids.shape[0] - 2  # the newest position with a hidden state
        num_new = new_hidden_states.shape[0]
        t0 = n - num_new + 1
        if t0 != self.kv_cache.num_cached:
            raise RuntimeError(f"drafter has encoded {self.kv_cache.num_cached} positions but "
                               f"received hidden states from position {t0}")
        # z_t pairs h_t with u_{t+1}; the trigram of x_{t0+1} needs (x_{t0-1}, x_{t0}).
        prefix = torch.stack([token_ids[t0 - 1] if t0 >= 1 else token_ids.new_tensor(-1),
                              token_ids[t0]])
        positions = torch.arange(t0, n + 1, device=token_ids.device)
        h = self.model.fuse_target_layers(new_hidden_states, new_layer_states)  # [M, d]
        s = self.model.encode(token_ids[t0 + 1: n + 2][None], h[None],
                              positions[None], prefix[None], self.kv_cache)
        next_token_id = token_ids[n + 1] if self.model.config.sequential_heads else None
        return self.model.propose(h[-1], s[0, -1], top_k, next_token_id)  # [K, top_k]


class TargetOracleDrafter:
    """Proposes the target's own greedy continuation as every head's best candidate
    (and arbitrary other tokens below it): every draft is then accepted under greedy
    decoding, which exercises the accept path of the decoder."""

    def __init__(self, target, num_heads: int):
        self.target, self.num_heads = target, num_heads

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def propose(self, token_ids, new_hidden_states, top_k):
        seq = token_ids
        best = []
        for _ in range(self.num_heads):
            nxt = self.target(input_ids=seq[None]).logits[0, -1].argmax()
            best.append(nxt)
            seq = torch.cat([seq, nxt[None]])
        best = torch.stack(best)  # [K]
        vocab = self.target.config.vocab_size
        offsets = torch.arange(top_k, device=best.device)
        return (best[:, None] + offsets) % vocab  # distinct, best first


def _choose_token(logits: torch.Tensor, temperature: float, generator) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _keep_cache_entries(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep only cache entries `keep` (indices along the sequence axis), in that order."""
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"reference decoder supports full-attention caches only, got {type(layer).__name__}")
        layer.keys = layer.keys.index_select(-2, keep)
        layer.values = layer.values.index_select(-2, keep)


class SpeculativeDecoder:
    def __init__(self, target, drafter: Drafter, tree: TokenTree):
        self.target, self.drafter, self.tree = target, drafter, tree
        self.decoder = target.base_model  # returns final-normed hidden states
        self.lm_head = target.get_output_embeddings()
        self.layer_ids = getattr(drafter, "target_layer_ids", None)  # the layers it reads

    def _forward(self, input_ids, cache, position_ids=None, attention_mask=None):
        """-> h [L, d], logits [L, V], and the drafter's layer inputs [L, n * d] (or None)."""
        with (capture_layer_inputs(self.target, self.layer_ids) if self.layer_ids
              else contextlib.nullcontext([None])) as captured:
            out = self.decoder(input_ids=input_ids[None], position_ids=position_ids,
                               attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[0]  # [L, d]
        layers = None if captured[-1] is None else captured[-1][0]
        return hidden, self.lm_head(hidden), layers

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None,
                 eos_token_id: int | None = None) -> GenerationResult:
        tree, device = self.tree, prompt_ids.device
        self.drafter.reset()
        cache = DynamicCache()
        hidden, logits, layers = self._forward(prompt_ids, cache)
        tokens = torch.cat([prompt_ids, prompt_ids.new_tensor([_choose_token(logits[-1], temperature, generator)])])
        result = GenerationResult([int(tokens[-1])])
        new_hidden, new_layers = hidden, layers  # the drafter has not seen any position yet
        while len(result.token_ids) < max_new_tokens and eos_token_id not in result.token_ids:
            reads_layers = {} if self.layer_ids is None else {"new_layer_states": new_layers}
            candidates = self.drafter.propose(tokens, new_hidden, tree.top_k, **reads_layers)  # [K, top_k]
            node_tokens = tree.candidate_tokens(tokens[-1], candidates.to(device))  # [T]
            prefix_len = tokens.shape[0] - 1  # x_0 .. x_n are cached; the root is x_{n+1}
            allowed = tree_attention_mask(tree.parents.to(device),
                                          torch.tensor([prefix_len], device=device))
            mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)  # [1, T, prefix + T]
            hidden, logits, layers = self._forward(node_tokens, cache,
                                           position_ids=(prefix_len + tree.depths.to(device))[None],
                                           attention_mask=mask[:, None])
            if temperature == 0.0:
                acceptance = accept_greedy(tree, node_tokens, logits)
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                acceptance = accept_sampling(tree, node_tokens, probs, generator)
            nodes = torch.tensor(acceptance.nodes, device=device)
            _keep_cache_entries(cache, torch.cat([torch.arange(prefix_len, device=device),
                                                  prefix_len + nodes]))
            new_tokens = node_tokens[nodes[1:]].tolist() + [acceptance.bonus_token]
            tokens = torch.cat([tokens, tokens.new_tensor(new_tokens)])
            new_hidden = hidden[nodes]  # positions n+1 .. n+1+num_accepted
            new_layers = None if layers is None else layers[nodes]
            result.accept_lengths.append(len(new_tokens))
            result.token_ids.extend(new_tokens)
        return _truncate(result, max_new_tokens, eos_token_id)


def _truncate(result: GenerationResult, max_new_tokens: int, eos_token_id) -> GenerationResult:
    ids = result.token_ids[:max_new_tokens]
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id) + 1]
    return GenerationResult(ids, result.accept_lengths)


@torch.no_grad()
def generate_plain(target, prompt_ids: torch.Tensor, max_new_tokens: int,
                   temperature: float = 0.0, generator: torch.Generator | None = None,
                   eos_token_id: int | None = None) -> GenerationResult:
    """The target alone, one token per forward pass, with a KV cache."""
    cache = DynamicCache()
    input_ids, result = prompt_ids, GenerationResult([])
    while len(result.token_ids) < max_new_tokens:
        logits = target(input_ids=input_ids[None], past_key_values=cache, use_cache=True).logits
        token = _choose_token(logits[0, -1], temperature, generator)
        result.token_ids.append(token)
        result.accept_lengths.append(1)
        if token == eos_token_id:
            break
        input_ids = prompt_ids.new_tensor([token])
    return result
