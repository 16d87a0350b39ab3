"""Skipping the draft pass: rows whose draft-layer KV is written on a later step.

Each step the proposer runs the encoder pass over every position the target computed, to
write the draft layer's KV for them and to read s at each request's last accepted row for
the heads. On a step where no request needs the heads (every drafting request drafts from
the lookup, or the batch stands aside) the pass buys nothing but that KV, so it is
skipped: each request's valid rows (x_{t+1}, t, h_t) are kept here instead, and the
request's next pass computes them first, in the same pass as its new rows, so its KV is
complete before any head reads it.

Worked example (padded drafter batch; row t holds (x_{t+1}, t, h_t), as set_inputs_first_pass
shifts the ids). A request has positions 0..9 in both KV caches and drafted 4 lookup tokens:
    step 1 (skipped): the target computes positions 10..14 and accepts 2 drafts, so rows
        10..12 are valid (row 12 holds the token sampled now), 13 and 14 are rejected.
        Deferred: start 10, rows 10..12. The draft layer's KV ends at position 9.
    step 2 (skipped): positions 13..17, nothing accepted: row 13 is valid. Deferred: start
        10, rows 10..13 (the continuation of what was deferred: 10 + 3 == 13).
    step 3 (the heads draft): positions 14..15 (the sampled token, one head draft). The
        request's query becomes rows 10..13 then 14..15: 6 rows from query start q, seq_len
        unchanged (16), so row t attends to the cached KV of 0..9 and to rows 10..t. Rows
        10..13 are written to the slots of positions 10..13 (from the block table), and the
        request's sample row moves from q + 1 to q + 1 + 4 (token_indices_to_sample + 4).
A request whose next rows do not continue its deferred ones (preempted and recomputed,
or finished) loses them: the recomputation writes its KV again, a finished request needs
none. Nothing here affects what the target accepts: only the draft's context is delayed.

At most `max_rows` rows (all requests together) wait at a time: the proposer's buffers
have that much room beyond vLLM's token budget, so a pass with every deferred row and a
full step still fits. A step whose rows would not fit runs its pass as usual.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

@dataclass
class _Rows:
    """One request's deferred rows: positions start .. start + num_rows - 1."""

    start: int
    input_ids: list[torch.Tensor] = field(default_factory=list)  # chunks of [n] x_{t+1}
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # chunks of [n, d] h_t
    num_rows: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_rows


class DeferredRows:
    """Per request, the rows whose encoder pass was skipped, in position order."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.num_rows = 0  # all requests together
        self._requests: dict[Hashable, _Rows] = {}

    def fits(self, num_new_rows: int) -> bool:
        return self.num_rows + num_new_rows <= self.max_rows

    def defer(self, req_id: Hashable, start: int, input_ids: torch.Tensor,
              hidden_states: torch.Tensor) -> None:
        """Keep rows start .. start + n - 1 ([n] ids, [n, d] hidden states, copied: they
        are views of buffers the next step overwrites)."""
        rows = self._requests.get(req_id)
        if rows is not None and rows.end != start:  # not their continuation: stale
            self._drop(req_id)
            rows = None
        if rows is None:
            rows = self._requests[req_id] = _Rows(start)
        rows.input_ids.append(input_ids.clone())
        rows.hidden_states.append(hidden_states.clone())
        rows.num_rows += len(input_ids)
        self.num_rows += len(input_ids)

    def take(self, req_id: Hashable, next_position: int):
        """(start, [m] ids, [m, d] hidden states) of the request's deferred rows, forgotten
        here, if they end right before `next_position` (its first row this step); else None."""
        rows = self._requests.get(req_id)
        if rows is None:
            return None
        self._drop(req_id)
        if rows.end != next_position:
            return None
        return rows.start, torch.cat(rows.input_ids), torch.cat(rows.hidden_states)

    def retire(self, live_req_ids: Collection) -> None:
        """Forget the rows of requests no longer among `live_req_ids` (they finished)."""
        for req_id in [r for r in self._requests if r not in live_req_ids]:
            self._drop(req_id)

    def _drop(self, req_id: Hashable) -> None:
        self.num_rows -= self._requests.pop(req_id).num_rows


def prepend(taken: dict[int, tuple], cad, num_tokens: int, token_indices_to_sample: torch.Tensor,
            input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
            block_size: int):
    """Rewrite the buffers' first rows as [request 0's deferred rows, its rows, request 1's
    deferred rows, ...]: taken {request index: DeferredRows.take(...)}, cad the first
    pass's CommonAttentionMetadata, the buffers as set_inputs_first_pass filled them.
    Returns (num_tokens, token_indices_to_sample, cad) of the merged rows.

    e.g. query_start_loc [0, 2, 5] (request 0: rows 0-1, request 1: rows 2-4) and 3 rows
    deferred for request 1: merged [0, 2, 8]; rows 0, 1, then the deferred 3 (source rows
    5, 6, 7 of [this step's 5; deferred 3]), then 2, 3, 4; request 1's sample row 4 -> 7.
    """
    device = input_ids.device
    old_starts = cad.query_start_loc_cpu.numpy().astype(np.int64)  # [num_reqs + 1]
    if old_starts[-1] != num_tokens:
        raise RuntimeError(f"chimera: {num_tokens} draft rows, but the requests' queries end "
                           f"at {old_starts[-1]}")
    num_reqs = len(old_starts) - 1
    num_deferred = np.zeros(num_reqs, dtype=np.int64)
    for i, (_, ids, _) in taken.items():
        num_deferred[i] = len(ids)
    query_lens = np.diff(old_starts) + num_deferred  # [num_reqs]
    starts = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=starts[1:])
    total = int(starts[-1])
    # Where each merged row comes from, in [this step's rows; deferred rows by request].
    source = np.empty(total, dtype=np.int64)
    deferred_positions, deferred_requests, offset = [], [], num_tokens
    for i in range(num_reqs):
        m, own = int(num_deferred[i]), starts[i] + num_deferred[i]
        if m:
            source[starts[i]:own] = np.arange(offset, offset + m)
            deferred_positions.append(np.arange(taken[i][0], taken[i][0] + m))
            deferred_requests.append(np.full(m, i))
            offset += m
        source[own:starts[i + 1]] = np.arange(old_starts[i], old_starts[i + 1])
    index = torch.from_numpy(source).to(device, non_blocking=True)  # [total]
    order = sorted(taken)
    extra_positions = torch.from_numpy(np.concatenate(deferred_positions)).to(device)  # [m_all]
    extra_requests = torch.from_numpy(np.concatenate(deferred_requests)).to(device)
    # The deferred positions' KV slots, from the block table as vLLM's own slot mappings.
    blocks = cad.block_table_tensor[extra_requests, extra_positions // block_size]
    extra_slots = blocks.to(torch.int64) * block_size + extra_positions % block_size
    slot_mapping = torch.cat([cad.slot_mapping[:num_tokens].to(torch.int64), extra_slots])[index]
    for buffer, extra in ((input_ids, [taken[i][1].to(input_ids.dtype) for i in order]),
                          (positions, [extra_positions.to(positions.dtype)]),
                          (hidden_states, [taken[i][2] for i in order])):
        merged = torch.cat([buffer[:num_tokens], *extra])[index]  # (a copy: then overwrite)
        buffer[:total] = merged
    shift = starts[1:] - old_starts[1:]  # [num_reqs]
    token_indices_to_sample = token_indices_to_sample + torch.from_numpy(shift).to(
        device=device, dtype=token_indices_to_sample.dtype)
    query_start_loc_cpu = torch.from_numpy(starts.astype(np.int32))
    cad = dataclasses.replace(
        cad, query_start_loc=query_start_loc_cpu.to(device, non_blocking=True),
        query_start_loc_cpu=query_start_loc_cpu, num_actual_tokens=total,
        max_query_len=int(query_lens.max()), slot_mapping=slot_mapping, positions=None,
        _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
    return total, token_indices_to_sample, cad
