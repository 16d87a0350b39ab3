"""Token-tree verification in vLLM's model runner: positions, acceptance, KV move.

A request whose last drafts were a tree (ChimeraProposer.take_tree_drafts) is scheduled
by vLLM like any request with num_nodes - 1 drafts: its query rows are the root (the
token sampled last step) and the tree's nodes in TokenTree order, its KV goes to the slots
of positions n .. n + num_nodes - 1 (n = its cached tokens). This module changes three
things about such a request, step by step (TreeRunnerPatch):

1. _prepare_inputs: node i gets RoPE position n + depth(i), not n + i, and the step's
   TreeStep (tree_attention.py) is attached to the target's attention metadata, so that
   node i attends to the prefix and its ancestors only.
2. _sample: after vLLM's rejection sampler (whose chain result for these rows is
   discarded), the tree is verified by verify.py's rules (greedy: the longest path whose
   every node is the target's argmax at its parent; sampling: multi-candidate rejection
   sampling), and the request's output row becomes [path tokens..., bonus token, -1...]:
   to the rest of vLLM (scheduler, metrics, detokenizer) the request accepted len(path)
   drafts, as a chain would.
3. Still in _sample, the accepted path is made what vLLM believes it accepted: the path's
   rows are moved to the front of the request's rows (token ids, positions, hidden states:
   the drafter's inputs), its target KV entries are moved to the slots of positions
   n + 1 .. n + len(path) (tree_attention.move_kv), and its tokens are written into the
   token history. Worked example: tree root -> {A, B}, A -> {C}, B -> {D} (nodes 0..4),
   target accepts B then D: path [0, 2, 4]; rows become [root, B, D, A, C]; KV of node 2
   moves from slot n + 2 to n + 1, node 4 from n + 4 to n + 2; the scheduler rejects the
   last 4 - 2 = 2 drafts, so positions n + 3, n + 4 are recomputed later, as for a chain.
   The drafter then runs on those rows exactly as after a chain step: its own layer's KV
   is written for the accepted path only.

Requests without a tree in the same batch are untouched (their rows keep vLLM's result).

Metrics: vLLM's own per-position acceptance counters (`vllm:spec_decode_num_accepted_
tokens_per_pos` in /metrics and LLM.get_metrics()) count, for a tree, the requests whose
accepted path reached depth i + 1 (a path of length a counts as a accepted "positions").
`STATS` here counts the tree steps alone, in this process (chimera-bench prints it).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from vllm.config import CUDAGraphMode
from vllm.sampling_params import _SAMPLING_EPS
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

from vllm_chimera.tree import TokenTree
from vllm_chimera.verify import accept_greedy, accept_sampling
from vllm_chimera.vllm.patching import ClassPatch
from vllm_chimera.vllm.spec_config import chimera_engine
from vllm_chimera.vllm.tree_attention import (TREE_BACKEND_IMPLS, TreeRows, TreeStep, kv_layout,
                                              move_kv)


def tree_allowed(sampling_params) -> bool:
    """Whether a request may draft a tree: vLLM applies penalties, bad words, allowed
    tokens, min-tokens, grammars and logprobs to draft rows as if they were a chain, so
    those requests draft chains; greedy and temperature / top-k / top-p sampling are
    per-row and verify as trees."""
    p = sampling_params
    return not (p.logprobs is not None or p.prompt_logprobs is not None
                or abs(p.presence_penalty) > _SAMPLING_EPS or abs(p.frequency_penalty) > _SAMPLING_EPS
                or abs(p.repetition_penalty - 1.0) > _SAMPLING_EPS
                or p.structured_outputs is not None or p.bad_words or p.allowed_token_ids
                or p.min_tokens > 0 or p.logit_bias or p.min_p > _SAMPLING_EPS)


def check_engine_supports_trees(vllm_config, tree) -> None:
    """Refuse, at start-up, engine settings a tree cannot run under (ValueError)."""
    problems = []
    if vllm_config.scheduler_config.async_scheduling:
        problems.append("asynchronous scheduling (set async_scheduling=False)")
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        problems.append("full CUDA graphs skip the tree mask (use cudagraph_mode PIECEWISE "
                        "or enforce_eager=True)")
    if vllm_config.model_config.uses_mrope:
        problems.append("M-RoPE positions")
    if vllm_config.speculative_config.disable_padded_drafter_batch:
        problems.append("disable_padded_drafter_batch")
    max_drafts = vllm_config.scheduler_config.max_num_batched_tokens - 1
    if tree.max_num_drafts > max_drafts:
        problems.append(f"a tree of {tree.max_num_drafts} drafted nodes (the scheduler "
                        f"verifies at most max_num_batched_tokens - 1 = {max_drafts})")
    if problems:
        raise ValueError("chimera tree: not supported with " + "; ".join(problems))


def check_target_supports_trees(runner, draft_layer_names) -> None:
    """Refuse target attention the tree rows cannot reproduce (ValueError)."""
    forward_context = runner.compilation_config.static_forward_context
    problems = set()
    for name, layer in forward_context.items():
        impl = getattr(layer, "impl", None)
        if name in draft_layer_names or impl is None:
            continue
        if type(impl).__name__ not in TREE_BACKEND_IMPLS:
            problems.add(f"attention backend {type(impl).__name__}")
        if getattr(impl, "sliding_window", None) not in (None, (-1, -1), -1):
            problems.add("sliding-window attention")
        if getattr(impl, "alibi_slopes", None) is not None:
            problems.add("ALiBi")
        if getattr(impl, "logits_soft_cap", None):
            problems.add("logit soft-capping")
        if getattr(impl, "sinks", None) is not None:
            problems.add("attention sinks")
        if getattr(impl, "kv_cache_dtype", "auto") != "auto":
            problems.add("a quantized KV cache")
    if problems:
        raise ValueError("chimera tree: the target uses " + ", ".join(sorted(problems))
                         + ", which tree verification does not support; use a chain "
                           "(no 'tree' in speculative_config)")


def check_kv_cache_groups(kv_cache_config, draft_layer_names) -> None:
    """The tree rows are gathered with one block table: the target's layers must share one
    KV-cache group (ValueError otherwise, at start-up)."""
    target_groups = [group for group in kv_cache_config.kv_cache_groups
                     if set(group.layer_names) - set(draft_layer_names)]
    if len(target_groups) > 1:
        raise ValueError("chimera tree: the target's layers span several KV-cache groups "
                         "(hybrid attention), which tree verification does not support; "
                         "use a chain (no 'tree' in speculative_config)")


@dataclass
class TreeStats:
    """Tree verifications in this process (the engine core's: in-process engines, the bench)."""

    num_trees: int = 0  # tree drafts verified
    num_nodes: int = 0  # drafted nodes verified (excluding roots)
    num_accepted_per_depth: list[int] = field(default_factory=list)  # paths reaching depth i+1
    # How often each node, named by its path of top-k ranks, was accepted (chimera-bench
    # --measure-tree derives the heads' per-rank accuracies from these).
    num_accepted_per_path: Counter = field(default_factory=Counter)

    def add(self, tree: TokenTree, path: list[int]) -> None:
        """One verified tree and its accepted path of node indices (root first)."""
        num_accepted = len(path) - 1
        self.num_trees += 1
        self.num_nodes += tree.num_nodes - 1
        if len(self.num_accepted_per_depth) < num_accepted:
            self.num_accepted_per_depth += [0] * (num_accepted - len(self.num_accepted_per_depth))
        for depth in range(num_accepted):
            self.num_accepted_per_depth[depth] += 1
        for node in path[1:]:
            self.num_accepted_per_path[tree.paths[node - 1]] += 1

    def reset(self) -> None:
        self.__init__()


STATS = TreeStats()


@dataclass
class _TreeRequest:
    rows: TreeRows
    tree: TokenTree
    req_id: str


class _StepState:
    """What one step's tree verification carries from _prepare_inputs to _sample."""

    def __init__(self, requests: list[_TreeRequest], step: TreeStep):
        self.requests, self.step = requests, step
        self.hidden_states: torch.Tensor | None = None  # [num_tokens, d], from execute_model
        # EAGLE-3-style aux hidden states (a draft with target_layer_ids reads these instead)
        self.aux_hidden_states: list[torch.Tensor] = []  # each [num_tokens, d]
        self.slot_mappings: dict[str, torch.Tensor] = {}  # target layer -> [num_tokens]


def _collect_tree_requests(runner, scheduler_output, num_scheduled_tokens) -> list[_TreeRequest]:
    """The requests of this step whose scheduled drafts are (a prefix of) a drafted tree."""
    take = getattr(runner.drafter, "take_tree_drafts", None)
    tree_drafts = take() if take is not None else {}
    if not tree_drafts:
        return []
    batch = runner.input_batch
    first_rows = runner.query_start_loc.np[: batch.num_reqs]  # [num_reqs]
    requests = []
    for req_id, scheduled in scheduler_output.scheduled_spec_decode_tokens.items():
        drafted = tree_drafts.get(req_id)
        num_drafts = len(scheduled)
        if drafted is None or num_drafts == 0:
            continue
        tree, tokens = drafted
        req_index = batch.req_id_to_index[req_id]
        # The scheduler may have cut the drafts (token budget, max_model_len): a prefix of
        # the node order is a tree. Anything else (not a decode step) is left to vLLM.
        if list(scheduled) != tokens[:num_drafts] or num_scheduled_tokens[req_index] != num_drafts + 1:
            continue
        tree = tree.truncated(num_drafts + 1)
        rows = TreeRows(first_row=int(first_rows[req_index]), num_nodes=tree.num_nodes,
                        num_computed=int(batch.num_computed_tokens_cpu[req_index]),
                        req_index=req_index, parents=tree.parents)
        requests.append(_TreeRequest(rows, tree, req_id))
    return requests


def _set_tree_positions(runner, requests: list[_TreeRequest]) -> None:
    """Node i at position n + depth(i) (vLLM wrote n + i; its slot stays that of n + i)."""
    rows = torch.cat([r.rows.first_row + torch.arange(r.tree.num_nodes) for r in requests])
    positions = torch.cat([r.rows.num_computed + r.tree.depths for r in requests])
    device = runner.positions.device
    runner.positions[rows.to(device)] = positions.to(device=device, dtype=runner.positions.dtype)


def verify_trees(runner, state: _StepState, logits: torch.Tensor, spec_decode_metadata,
                 sampler_output) -> None:
    """Accept each tree request's path, rewrite its output row, compact its rows and KV."""
    num_draft_tokens = spec_decode_metadata.num_draft_tokens  # list, per request
    # Request r's logits rows start after every earlier request's drafts + bonus row.
    logits_start = [sum(num_draft_tokens[:r]) + r for r in range(len(num_draft_tokens) + 1)]
    output = sampler_output.sampled_token_ids  # [num_reqs, max_spec_len + 1]
    for request in state.requests:
        rows, tree = request.rows, request.tree
        start = logits_start[rows.req_index]
        node_logits = logits[start: start + tree.num_nodes].float()  # [T, V]
        node_tokens = runner.input_ids.gpu[rows.first_row: rows.first_row + tree.num_nodes].clone()
        params = runner.requests[request.req_id].sampling_params
        acceptance = (accept_greedy(tree, node_tokens, node_logits) if params.temperature < _SAMPLING_EPS
                      else accept_sampling(tree, node_tokens, _target_probs(node_logits, params)))
        path = acceptance.nodes  # [0, ...] root first
        STATS.add(tree, path)
        accepted = node_tokens[path[1:]].tolist() + [acceptance.bonus_token]
        output[rows.req_index].fill_(-1)
        output[rows.req_index, : len(accepted)] = torch.tensor(accepted, device=output.device,
                                                               dtype=output.dtype)
        _compact(runner, state, rows, path, node_tokens)


def _target_probs(node_logits: torch.Tensor, params) -> torch.Tensor:
    """The target's distribution at each node under the request's temperature, top-k and
    top-p, as vLLM's sampler builds it ([T, V] -> [T, V])."""
    num_rows, device = node_logits.shape[0], node_logits.device
    top_k = (torch.full((num_rows,), params.top_k, device=device, dtype=torch.long)
             if 0 < params.top_k < node_logits.shape[-1] else None)
    top_p = (torch.full((num_rows,), params.top_p, device=device) if params.top_p < 1.0 else None)
    scaled = apply_top_k_top_p(node_logits / params.temperature, top_k, top_p)
    return scaled.softmax(dim=-1)


def _compact(runner, state: _StepState, rows: TreeRows, path: list[int],
             node_tokens: torch.Tensor) -> None:
    """Make the accepted path the first rows, KV entries and history tokens of the request."""
    if path == list(range(len(path))):  # the path already is the chain prefix
        return
    num_nodes, first = rows.num_nodes, rows.first_row
    rest = [node for node in range(num_nodes) if node not in set(path)]
    order = torch.tensor(path + rest, device=runner.input_ids.gpu.device) + first  # [T]
    span = slice(first, first + num_nodes)
    runner.input_ids.gpu[span] = runner.input_ids.gpu[order]
    runner.positions[span] = runner.positions[order.to(runner.positions.device)]
    for states in [state.hidden_states, *state.aux_hidden_states]:  # [num_tokens, d] each
        states[span] = states[order.to(states.device)]
    # The history the drafter's lookup reads (bookkeeping writes the same tokens later).
    n = rows.num_computed
    runner.input_batch.token_ids_cpu[rows.req_index, n + 1: n + len(path)] = (
        node_tokens[path[1:]].cpu().numpy())
    # Target KV: node path[d] was written at the slot of row first + path[d]; it belongs at
    # the slot of row first + d (position n + d).
    moved = [d for d in range(1, len(path)) if path[d] != d]
    forward_context = runner.compilation_config.static_forward_context
    for layer_name, slot_mapping in state.slot_mappings.items():
        src = slot_mapping[torch.tensor([first + path[d] for d in moved], device=slot_mapping.device)]
        dst = slot_mapping[torch.tensor([first + d for d in moved], device=slot_mapping.device)]
        layer = forward_context[layer_name]
        move_kv(layer.kv_cache, kv_layout(layer), src, dst)


class TreeRunnerPatch(ClassPatch):
    """The model runner's tree steps (module docstring). Inactive unless the engine's
    drafter proposed a tree last step."""

    target = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    replaces = ("_prepare_inputs", "_build_attention_metadata", "execute_model", "_sample")

    @staticmethod
    def _prepare_inputs(original, self, scheduler_output, num_scheduled_tokens):
        result = original(self, scheduler_output, num_scheduled_tokens)
        self._chimera_tree_state = None
        if chimera_engine(self.vllm_config):
            requests = _collect_tree_requests(self, scheduler_output, num_scheduled_tokens)
            if requests:
                _set_tree_positions(self, requests)
                step = TreeStep.build([r.rows for r in requests], self.device)
                self._chimera_tree_state = _StepState(requests, step)
        return result

    @staticmethod
    def _build_attention_metadata(original, self, *args, **kwargs):
        attn_metadata, spec_decode_cad = original(self, *args, **kwargs)
        state = getattr(self, "_chimera_tree_state", None)
        if state is not None and not kwargs.get("for_cudagraph_capture", False):
            if not isinstance(attn_metadata, dict):
                raise RuntimeError("chimera tree: micro-batched attention metadata is not supported")
            draft_layers = getattr(self.drafter, "_draft_attn_layer_names", set())
            for layer_name, metadata in attn_metadata.items():
                metadata.chimera_tree = state.step  # read by tree_attention's backend patches
                if layer_name not in draft_layers:
                    state.slot_mappings[layer_name] = metadata.slot_mapping
        return attn_metadata, spec_decode_cad

    @staticmethod
    def execute_model(original, self, scheduler_output, *args, **kwargs):
        result = original(self, scheduler_output, *args, **kwargs)
        state = getattr(self, "_chimera_tree_state", None)
        if state is not None and self.execute_model_state is not None:
            state.hidden_states = self.execute_model_state.hidden_states
            state.aux_hidden_states = list(self.execute_model_state.aux_hidden_states or [])
        return result

    @staticmethod
    def _sample(original, self, logits, spec_decode_metadata):
        sampler_output = original(self, logits, spec_decode_metadata)
        state, self._chimera_tree_state = getattr(self, "_chimera_tree_state", None), None
        if state is not None and spec_decode_metadata is not None:
            verify_trees(self, state, logits, spec_decode_metadata, sampler_output)
        return sampler_output
