"""Chimera's peers: Medusa-1 heads and an EAGLE-1 draft, trained by our trainer on the same
data and budget as Chimera, exported for vLLM 0.32's own `medusa` and `eagle` methods.

Pure PyTorch (no vLLM import). Each peer's parameter names ARE the names vLLM's loader reads,
so `export` writes the state dict as it is (plus a config.json):

Medusa (vllm/model_executor/models/medusa.py, `Medusa`): vLLM hands the proposer h_n, the
target's final-normed hidden state at the last accepted position (what the LM head reads),
and head i proposes x_{n+2+i} as argmax LMHead_i(ResidualBlock_i(h_n)), where a
ResidualBlock is `x = x + SiLU(W x + b)` repeated num_hidden_layers times. The labels are
Chimera's (loss.head_labels), the per-head LM heads start as copies of the target's and the
residual weights at zero, so an untrained head predicts what the target predicts from h_n.
With a reduced draft vocabulary (draft_vocab_size: Chimera's, trainer.frequent_token_ids) the
export is vLLM's truncated-vocabulary Medusa: config truncated_vocab_size, an int64
`token_map` of target ids, LM-head weights [draft_vocab_size, d]; vLLM scatters the reduced
logits back into the full vocabulary (-inf elsewhere), so its argmax is our argmax mapped back.
vLLM 0.32 loads it with original_lm_head only (shared_lm_head: one trained reduced LM head in
lm_heads.0.weight, loaded as it is) and only with REDUCED_MEDUSA_ENGINE_KWARGS.

EAGLE-1 (vllm/model_executor/models/llama_eagle.py, `EagleLlamaForCausalLM`): for each
position t the draft reads (x_{t+1}, h_t) at RoPE position t (the EAGLE proposer's first
pass shifts the tokens by one), `z = fc([E(x_{t+1}); h_t])` (2d -> d, no bias), then one
Llama decoder layer whose input RMSNorm is removed, and no final norm: the output f_t is
both what the target's LM head reads (proposing x_{t+2}) and the stand-in for h_{t+1} that
the next draft step reads at position t+1 with the token it just proposed. Training
(EAGLE-1): smooth-L1 regression of f_t onto h_{t+1} plus 0.1 x cross-entropy of LMHead(f_t)
against the target's greedy x_{t+2}, with U(-0.1, 0.1) noise on the input features h_t (the
paper's robustness to the draft's own, imperfect features at later steps). Validation also runs steps 2..K the way vLLM does,
feeding back the draft's own tokens and features (see EagleAttention for the masks).
The embedding and LM head are the target's, frozen and not saved: vLLM shares the target's
when the checkpoint has none.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig

from vllm_chimera.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from vllm_chimera.config import ChimeraConfig
from vllm_chimera.model import (EncoderAttention, GatedMLP, RMSNorm, apply_rotary,
                                rotary_cos_sin)
from vllm_chimera.training.loss import IGNORE, HeadsLoss, batch_labels

PEER_KINDS = ("medusa", "eagle")
# The draft_overrides each peer accepts (TrainingSettings.draft_overrides), with defaults.
PEER_OPTIONS = {
    "medusa": {"num_layers": 1, "shared_lm_head": False, "draft_vocab_size": None},
    "eagle": {"intermediate_size": None, "regression_weight": 1.0, "classification_weight": 0.1,
              "feature_noise": 0.1},
}
PROVENANCE_KEY = "vllm_chimera"  # a config.json entry vLLM ignores: which peer, its K
# The engine arguments (LLM(...)) vLLM 0.32 needs to load a reduced-vocabulary Medusa: its
# Medusa.load_weights turns token_map into a parameter but does not report it as loaded, so
# the default loader's check that every parameter came from the checkpoint fails.
REDUCED_MEDUSA_ENGINE_KWARGS = {"model_loader_extra_config": {"enable_weights_track": False}}


def check_peer_options(kind: str, overrides: dict) -> list[str]:
    """Problems with `overrides` for a peer of `kind` (empty if none)."""
    if kind not in PEER_OPTIONS:
        return [f"draft_kind must be one of chimera, {', '.join(PEER_KINDS)}; got {kind!r}"]
    unknown = sorted(set(overrides) - set(PEER_OPTIONS[kind]))
    if unknown:
        why = (": vLLM's EAGLE-1 drafts with the target's own full-vocabulary LM head"
               if kind == "eagle" and "draft_vocab_size" in unknown else "")
        return [f"draft_overrides {unknown} do not apply to {kind} drafts "
                f"(it takes {sorted(PEER_OPTIONS[kind])}){why}"]
    size = overrides.get("draft_vocab_size")
    if size is not None and not (isinstance(size, int) and size > 0):
        return [f"draft_vocab_size must be a positive integer, got {size!r}"]
    return []


class PeerDraft(nn.Module):
    """What the trainer needs of a peer: the target's frozen embedding / LM head, export, reload."""

    kind = ""

    def __init__(self):
        super().__init__()
        self._target_embed: torch.Tensor | None = None  # [V, d], the target's, not ours
        self._target_lm_head: torch.Tensor | None = None  # [V, d]

    def bind_target(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> "PeerDraft":
        self._target_embed = embed_weight.detach()
        self._target_lm_head = lm_head_weight.detach()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def export_config(self) -> dict:
        raise NotImplementedError

    def export_extras(self) -> dict[str, torch.Tensor]:
        """Tensors vLLM needs that are not this module's parameters (e.g. a shared LM head)."""
        return {}

    def export(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors that vLLM 0.32 loads for `self.kind`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {**self.state_dict(), **self.export_extras()}
        state = {k: v.detach().to(dtype if dtype and v.is_floating_point() else v.dtype)
                 .contiguous().cpu() for k, v in state.items()}  # id maps stay int64
        # A temporary name first: an interrupted export never leaves a torn file behind.
        save_file(state, str(folder / (WEIGHTS_NAME + ".tmp")), metadata={"format": "pt"})
        os.replace(folder / (WEIGHTS_NAME + ".tmp"), folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(self.export_config(), indent=2) + "\n")
        return folder

    def load_exported(self, folder: str | os.PathLike) -> "PeerDraft":
        """Load weights written by `export` (strict: every parameter, nothing unknown)."""
        state = load_file(str(Path(folder) / WEIGHTS_NAME))
        for name in self.export_extras():
            state.pop(name, None)
        own = self.state_dict()
        self.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
        return self

    def _provenance(self, **fields) -> dict:
        return {PROVENANCE_KEY: {"draft_kind": self.kind, **fields}}


# -- Medusa-1 ----------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """vLLM's Medusa ResidualBlock: x = x + SiLU(W x + b), num_layers times (W, b start at 0)."""

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        for layer in self.layers:  # SiLU(0) = 0: an untrained block passes h through
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(PeerDraft):
    """K Medusa-1 heads on the target's final-normed h_n; head i proposes x_{n+2+i}.

    shared_lm_head=False (Medusa-1): each head has its own LM head, a trainable copy of the
    target's. True: every head reads the target's frozen LM head (vLLM's `original_lm_head`).

    draft_vocab_size (vLLM's `truncated_vocab_size`, below the target's vocabulary size):
    the heads project onto that many target tokens only, `token_map` ([draft_vocab_size]
    target ids, the checkpoint key vLLM reads) maps a logit's index back to its target id.
    Each LM head then starts as the target's rows of those tokens: one per head, or with
    shared_lm_head ONE trainable reduced LM head shared by every head (as Chimera's
    draft_lm_head). vLLM 0.32 runs only the shared form: its per-head LM heads are built
    full-size and its loader refuses [draft_vocab_size, d] weights for them; and it loads
    the shared form only with REDUCED_MEDUSA_ENGINE_KWARGS (see vllm_engine_kwargs).
    """

    kind = "medusa"

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int = 1,
                 shared_lm_head: bool = False, draft_vocab_size: int | None = None):
        super().__init__()
        if draft_vocab_size is not None and not 0 < draft_vocab_size < vocab_size:
            # (vLLM ignores token_map when truncated_vocab_size == vocab_size.)
            raise ValueError(f"Medusa's draft_vocab_size must be in [1, vocab_size={vocab_size}), "
                             f"got {draft_vocab_size!r}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers, self.shared_lm_head = num_heads, num_layers, shared_lm_head
        self.draft_vocab_size = draft_vocab_size
        self.blocks = nn.ModuleList(ResidualBlock(hidden_size, num_layers) for _ in range(num_heads))
        # The target id of each reduced-vocabulary id (vLLM's Medusa name), set by
        # bind_target's frequent_token_ids or a load; None: the ids are target ids.
        self.register_buffer("token_map", None if draft_vocab_size is None
                             else torch.arange(draft_vocab_size))
        # Own LM heads: one per head; one shared reduced head; none (the target's, frozen).
        count = num_heads if not shared_lm_head else 0 if draft_vocab_size is None else 1
        self.lm_heads = nn.ModuleList(nn.Linear(hidden_size, draft_vocab_size or vocab_size,
                                                bias=False) for _ in range(count))

    def bind_target(self, embed_weight, lm_head_weight, frequent_token_ids: torch.Tensor | None = None):
        """Also (re)starts each own LM head as (the token_map rows of) the target's; a later
        load overrides. frequent_token_ids ([draft_vocab_size] target ids): the reduced
        vocabulary (training sets it once; a loaded draft carries its token_map)."""
        super().bind_target(embed_weight, lm_head_weight)
        with torch.no_grad():
            if frequent_token_ids is not None:
                if self.draft_vocab_size is None or len(frequent_token_ids) != self.draft_vocab_size:
                    raise ValueError(f"{len(frequent_token_ids)} frequent_token_ids for a Medusa "
                                     f"draft_vocab_size of {self.draft_vocab_size}")
                self.token_map.copy_(frequent_token_ids)
            rows = lm_head_weight if self.draft_vocab_size is None else lm_head_weight[self.token_map]
            for head in self.lm_heads:
                head.weight.copy_(rows)
        return self

    def head_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., d] final-normed h -> logits [K, ..., V] (or [K, ..., draft_vocab_size])."""
        return self.project(self.head_states(hidden_states))

    def head_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What each head feeds its LM head: [..., d] -> [K, ..., d]."""
        return torch.stack([block(hidden_states) for block in self.blocks])

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """Each head's LM head over its states: [K, ..., d] -> [K, ..., V or V_draft]."""
        logits = []
        for i in range(self.num_heads):
            if not self.lm_heads:
                weight = self._target_lm_head
            else:
                weight = self.lm_heads[0 if self.shared_lm_head else i].weight
            logits.append(states[i] @ weight.t().to(states.dtype))
        return torch.stack(logits)

    def export_extras(self):
        # vLLM's original_lm_head loads its one LM head from "lm_heads.0.weight" (with a
        # reduced vocabulary that is our own trained [draft_vocab_size, d] head, a parameter).
        return {} if self.lm_heads else {"lm_heads.0.weight": self._target_lm_head}

    def export_config(self) -> dict:
        """vLLM's MedusaConfig (model_type "medusa"). Its from_pretrained renames every key
        with "num" and "heads" in it to num_heads, so no other such key may appear here."""
        return {"architectures": ["MedusaModel"], "model_type": "medusa",
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "truncated_vocab_size": self.draft_vocab_size or self.vocab_size,
                "num_heads": self.num_heads,
                "num_hidden_layers": self.num_layers, "medusa_fc_bias": True,
                "original_lm_head": self.shared_lm_head,
                "n_predict": self.num_heads,  # vLLM's default num_speculative_tokens
                **self._provenance(num_speculative_tokens=self.num_heads,
                                   **({"engine_kwargs": REDUCED_MEDUSA_ENGINE_KWARGS}
                                      if self.draft_vocab_size else {}))}


class MedusaLoss(HeadsLoss):
    """Chimera's per-head self-distillation loss, on Medusa's heads (with kl_weight, Medusa-2's
    self-distillation from the target's distribution)."""

    draft: MedusaHeads

    def draft_vocabulary(self):
        if self.draft.draft_vocab_size is None:
            return None
        return self.draft.token_map, self.draft.vocab_size

    def head_states(self, tokens, hidden, selected, greedy):
        return self.draft.head_states(hidden[:, :-1][selected])  # [K, P, d]

    def project(self, states):
        return self.draft.project(states)  # [K, P, V or V_draft]

    def target_lm_head(self):
        return self.draft._target_lm_head


# -- EAGLE-1 -----------------------------------------------------------------------------------
class EagleAttention(EncoderAttention):
    """The encoder layer's attention (same projections, RoPE) with the masks of vLLM's EAGLE loop.

    Pass 1 (past empty) is causal over the sequence, as the proposer's first pass over the
    accepted tokens. Pass j >= 2 at every position t at once replays draft step j from
    position n = t: its query at position t+j-1 sees what vLLM's paged KV cache then holds,
    the first-pass keys at positions <= t and the keys of passes 2..j at the same t.
    """

    def _split(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        B, L, _ = x.shape  # [B, L, num_heads * head_dim] -> [B, num_heads, L, head_dim]
        return x.view(B, L, num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, past=()):
        """x [B, L, d] at positions [B, L]; past: (keys, values) of the earlier passes.

        Returns (out [B, L, d], (keys, values) of this pass)."""
        B, L, _ = x.shape
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        q = apply_rotary(self._split(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rotary(self._split(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._split(self.v_proj(x), self.num_kv_heads)
        gqa = self.num_heads != self.num_kv_heads
        if not past:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            keys = torch.cat([pk for pk, _ in past] + [k], dim=2)  # [B, kv_heads, (1+j) L, hd]
            values = torch.cat([pv for _, pv in past] + [v], dim=2)
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            same = torch.eye(L, dtype=torch.bool, device=x.device)
            mask = torch.cat([causal] + [same] * len(past), dim=1)  # [L, (1+j) L]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), (k, v)


class EagleLayer(nn.Module):
    """vLLM's EAGLE-1 decoder layer: a Llama layer without input norm (vLLM deletes it)."""

    def __init__(self, shape: ChimeraConfig):
        super().__init__()
        self.self_attn = EagleAttention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = GatedMLP(shape)

    def forward(self, x, positions, past=()):
        attended, kv = self.self_attn(x, positions, past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def eagle_llama_config(target_config) -> dict:
    """The target's Llama config as a dict, refused where vLLM's EAGLE layer would differ
    from ours (EagleAttention has plain RoPE and no biases)."""
    config = target_config.to_dict()
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    problems = [f"{key}={config.get(key)!r}" for key, ok in (
        ("model_type", config.get("model_type") == "llama"),
        ("hidden_act", config.get("hidden_act", "silu") == "silu"),
        ("attention_bias", not config.get("attention_bias")),
        ("mlp_bias", not config.get("mlp_bias"))) if not ok]
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r}")
    if problems:
        raise ValueError("the EAGLE peer supports Llama targets with plain RoPE, no biases and "
                         "SiLU; this target has " + ", ".join(problems))
    return config


class EagleDraft(PeerDraft):
    """EAGLE-1 for a Llama target, as vLLM's EagleLlamaForCausalLM (see the module docstring)."""

    kind = "eagle"

    def __init__(self, llama_config: dict, num_steps: int = 4, initializer_range: float = 0.02):
        """llama_config: the target's config dict (eagle_llama_config); its intermediate_size
        is the draft layer's MLP width. num_steps: the draft steps (K) validated, and the
        num_speculative_tokens the export suggests."""
        super().__init__()
        self.llama_config = dict(llama_config)
        self.num_steps = num_steps
        # The layer's shape (heads, head_dim, RoPE theta, eps, MLP width) as the project reads it.
        shape = ChimeraConfig.for_target(LlamaConfig.from_dict(self.llama_config))
        d = shape.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=False)  # [E(x_{t+1}); h_t] -> z_t
        self.layers = nn.ModuleList([EagleLayer(shape)])
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=initializer_range)

    def features(self, next_token_ids: torch.Tensor, hidden_states: torch.Tensor,
                 positions: torch.Tensor, past=()):
        """next_token_ids [B, L] (x_{t+1}), hidden_states [B, L, d] (h_t, or the previous
        pass's features), positions [B, L] -> (features f [B, L, d], this pass's (keys, values))."""
        embeds = F.embedding(next_token_ids, self._target_embed).to(hidden_states.dtype)
        z = self.fc(torch.cat([embeds, hidden_states], dim=-1))  # [B, L, d]
        return self.layers[0](z, positions, past)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V]: the target's LM head, with no norm before it (as in vLLM)."""
        return features @ self._target_lm_head.t().to(features.dtype)

    def rollout(self, next_token_ids: torch.Tensor, hidden_states: torch.Tensor,
                positions: torch.Tensor, num_steps: int, selected: torch.Tensor | None = None):
        """Draft steps 1..num_steps from every position n = t at once, as vLLM's EAGLE
        proposer runs them: step j reads the token step j-1 proposed and its features, at
        position t+j-1 (see EagleAttention for what it attends to).

        next_token_ids [B, L] (x_{t+1}), hidden_states [B, L, d] (h_t), positions [B, L] (t);
        selected [B, L] bool: where logits are needed (default everywhere; the LM head is
        the expensive part). Returns (step-1 features [B, L, d], logits [S, P, V] float32
        at the P selected positions).
        """
        if selected is None:
            selected = torch.ones_like(next_token_ids, dtype=torch.bool)
        first, kv = self.features(next_token_ids, hidden_states, positions)  # [B, L, d]
        logits, features, past = [self.logits(first[selected]).float()], first, [kv]
        for j in range(1, num_steps):
            # Unselected positions get token 0: their steps only ever see themselves.
            fed = torch.zeros_like(next_token_ids)
            fed[selected] = logits[-1].argmax(-1)
            features, kv = self.features(fed, features, positions + j, past)
            past.append(kv)
            logits.append(self.logits(features[selected]).float())
        return first, torch.stack(logits)

    def export_config(self) -> dict:
        """A Llama config with one layer: vLLM wraps it in its EAGLEConfig, which renames the
        architecture LlamaForCausalLM to EagleLlamaForCausalLM."""
        config = {k: v for k, v in self.llama_config.items()
                  if k not in ("_name_or_path", "_model_name_or_path", "quantization_config")}
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=1,
                      intermediate_size=self.layers[0].mlp.up_proj.out_features)
        config.update(self._provenance(num_speculative_tokens=self.num_steps))
        return config


class EagleLoss(nn.Module):
    """EAGLE-1: regression weight x smooth-L1(f_t, h_{t+1}) + classification weight x CE(LMHead(f_t),
    target's greedy x_{t+2}); in training, U(-feature_noise, feature_noise) is added to h_t.

    forward(batch) -> (loss, stats [S + 1, 3]): rows 0..S-1 are draft steps 1..S as
    [CE sum, correct, count] (S = 1 in training, K in eval mode, where steps 2..K run as vLLM
    runs them), the last row is [regression sum, 0, count].
    """

    def __init__(self, draft: EagleDraft, num_steps: int, loss_on: str = "responses",
                 regression_weight: float = 1.0, classification_weight: float = 0.1,
                 feature_noise: float = 0.1):
        super().__init__()
        self.draft, self.num_steps, self.loss_on = draft, num_steps, loss_on
        self.regression_weight, self.classification_weight = regression_weight, classification_weight
        self.feature_noise = feature_noise

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, hidden = batch["tokens"], batch["hidden"]  # [B, L], [B, L, d]
        B, L = tokens.shape
        labels = batch_labels(batch, self.loss_on, self.num_steps)  # [K, B, L-1]; step j = row j-1
        selected = (labels != IGNORE).any(0)  # [B, L-1]
        self.last_selected = selected  # validation splits its figures by position
        positions = torch.arange(L - 1, device=tokens.device).expand(B, L - 1)
        steps = 1 if self.training else self.num_steps  # EAGLE-1 trains its first step only
        inputs = hidden[:, :-1]  # [B, L-1, d]: h_t
        if self.training and self.feature_noise:
            inputs = inputs + (torch.rand_like(inputs) - 0.5) * (2 * self.feature_noise)
        features, logits = self.draft.rollout(tokens[:, 1:], inputs, positions, steps,
                                              selected)  # [B, L-1, d], [S, P, V]
        first = labels[0] != IGNORE  # [B, L-1]: positions with an x_{t+2}, hence an h_{t+1}
        regression = F.smooth_l1_loss(features[first].float(), hidden[:, 1:][first].float(),
                                      reduction="none").mean(-1)  # [P_first]
        return self._loss_and_stats(logits, labels[:steps, selected], regression)

    def _loss_and_stats(self, logits, labels, regression):
        """logits [S, P, V], labels [S, P], regression [P_first] -> (loss, stats [S + 1, 3])."""
        valid = labels != IGNORE  # [S, P]
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                    reduction="none").view(labels.shape)
        counts = valid.sum(-1)  # [S]
        loss = (self.regression_weight * regression.sum() / max(regression.numel(), 1)
                + self.classification_weight * per_token[0].sum() / counts[0].clamp(min=1))
        with torch.no_grad():
            hits = (logits.argmax(-1) == labels) & valid  # [S, P]
            self.last_hits, self.last_valid = hits, valid  # for validation's acceptance estimate
            stats = torch.stack([per_token.sum(-1), hits.sum(-1).float(), counts.float()], dim=-1)
            reg_row = torch.stack([regression.sum(), regression.new_zeros(()),
                                   regression.new_tensor(float(regression.numel()))])
        return loss, torch.cat([stats, reg_row[None].to(stats)])

    def summarize(self, stats: torch.Tensor) -> dict:
        """Summed stats [S + 1, 3] -> the logged figures (head_* are per draft step)."""
        steps, (reg_sum, _, reg_count) = stats[:-1], stats[-1].tolist()
        counts = steps[:, 2].clamp(min=1)
        head_loss = (steps[:, 0] / counts).tolist()
        regression = reg_sum / max(reg_count, 1)
        return {"loss": self.regression_weight * regression + self.classification_weight * head_loss[0],
                "head_loss": head_loss, "head_accuracy": (steps[:, 1] / counts).tolist(),
                "head_tokens": steps[:, 2].long().tolist(), "regression_loss": regression}


# -- building, losses, loading -----------------------------------------------------------------
def build_peer(kind: str, target: nn.Module, num_heads: int, overrides: dict | None = None,
               frequent_token_ids: torch.Tensor | None = None) -> PeerDraft:
    """A fresh peer of `kind` for a Hugging Face target, bound to its embedding and LM head.

    frequent_token_ids: Medusa's reduced vocabulary when overrides set draft_vocab_size
    (trainer.frequent_token_ids, the one Chimera's is chosen by)."""
    problems = check_peer_options(kind, overrides or {})
    if problems:
        raise ValueError("; ".join(problems))
    options = {**PEER_OPTIONS[kind], **(overrides or {})}
    text_config = target.config.get_text_config()
    embed, lm_head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    if kind == "medusa":
        size = options["draft_vocab_size"]
        if (size is None) != (frequent_token_ids is None):
            raise ValueError("a Medusa draft_vocab_size and its frequent_token_ids go together")
        if size is not None and not options["shared_lm_head"]:
            warnings.warn("Medusa with a reduced vocabulary and an LM head per head trains and "
                          "evaluates here, but vLLM 0.32 cannot load it (it builds per-head LM "
                          "heads full-size; only original_lm_head takes a reduced one): add "
                          "shared_lm_head (--medusa-shared-lm-head) to run it in vLLM",
                          stacklevel=2)
        peer = MedusaHeads(text_config.hidden_size, text_config.vocab_size, num_heads,
                           options["num_layers"], options["shared_lm_head"], size)
        return peer.bind_target(embed, lm_head, frequent_token_ids)
    config = eagle_llama_config(text_config)
    if options["intermediate_size"]:
        config["intermediate_size"] = options["intermediate_size"]
    return EagleDraft(config, num_steps=num_heads).bind_target(embed, lm_head)


def peer_loss(draft: PeerDraft, head_weights: list[float], loss_on: str,
              overrides: dict | None = None, positions_fraction: float | None = None,
              kl_weight: float = 0.0, regression_weight: float = 0.0,
              skip_lookup_matches: int | None = None) -> nn.Module:
    """The training loss of a peer (head_weights: Medusa's per-head weights; its length is K;
    positions_fraction, kl_weight, regression_weight, skip_lookup_matches: Medusa's, as
    HeadsLoss's; EAGLE has its own regression in `overrides`, and TrainingSettings refuses the
    others for it)."""
    if isinstance(draft, MedusaHeads):
        return MedusaLoss(draft, head_weights, loss_on, positions_fraction, kl_weight,
                          regression_weight, skip_lookup_matches)
    options = {**PEER_OPTIONS["eagle"], **(overrides or {})}
    return EagleLoss(draft, len(head_weights), loss_on, options["regression_weight"],
                     options["classification_weight"], options["feature_noise"])


def peer_kind(folder: str | os.PathLike) -> str | None:
    """"medusa" or "eagle" for a folder `export` wrote, None for anything else."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    return (json.loads(path.read_text()).get(PROVENANCE_KEY) or {}).get("draft_kind")


def vllm_engine_kwargs(folder: str | os.PathLike) -> dict:
    """The extra LLM(...) arguments vLLM 0.32 needs to load the peer `export` wrote to
    `folder` ({} for most; see REDUCED_MEDUSA_ENGINE_KWARGS)."""
    config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    return dict((config.get(PROVENANCE_KEY) or {}).get("engine_kwargs") or {})


def load_peer(folder: str | os.PathLike, target: nn.Module) -> PeerDraft:
    """An exported peer, bound to `target` (a Hugging Face causal LM)."""
    config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    kind = (config.get(PROVENANCE_KEY) or {}).get("draft_kind")
    if kind == "medusa":
        truncated = config.get("truncated_vocab_size", config["vocab_size"])
        peer = MedusaHeads(config["hidden_size"], config["vocab_size"], config["num_heads"],
                           config["num_hidden_layers"], config["original_lm_head"],
                           truncated if truncated < config["vocab_size"] else None)
    elif kind == "eagle":
        peer = EagleDraft({k: v for k, v in config.items() if k != PROVENANCE_KEY},
                          num_steps=config[PROVENANCE_KEY]["num_speculative_tokens"])
    else:
        raise ValueError(f"{folder} is not a Medusa or EAGLE draft exported by vllm-chimera")
    peer.bind_target(target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    param = next(target.parameters())
    return peer.load_exported(folder).to(device=param.device, dtype=param.dtype)
