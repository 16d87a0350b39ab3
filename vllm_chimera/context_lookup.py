"""The context lookup's rules, from the token ids alone: where it drafts, and what.

Inside vLLM the proposer first asks the context lookup (`vllm_chimera/vllm/lookup.py`) for
each request's draft, and the heads draft only where it finds no match. A match exists
exactly when the context's last `min_match` tokens occur earlier in the context (any
earlier occurrence, overlapping the suffix or not; a longer match contains this one). So a
training run can tell which positions the heads will ever be asked to draft at, and spend
its budget there (`chimera-train --skip-lookup-matches`), and validation can score the
heads where they matter (`lookup_matches`). Small models repeat themselves: the lookup
matches at 73% of the positions of SmolLM2's own answers to held-out ShareGPT prompts and
at 60% of its MT-bench answers' (validation's `lookup_misses` share;
results/training/README.md, "Where the heads draft"). What it drafts there:
`latest_match`.

`tests/test_vllm_lookup.py` checks both against vLLM's n-gram matcher.
"""
from __future__ import annotations

import numpy as np
import torch

# speculative_config["lookup"]["min_match"] when unset (LookupSettings reads it from here).
DEFAULT_MIN_MATCH = 2
# speculative_config["lookup"]["occurrence"]: which earlier occurrence of the matched suffix
# the lookup drafts from; "latest" (`latest_match`, the default) or "earliest" (vLLM's
# n-gram matcher).
OCCURRENCES = ("latest", "earliest")


def latest_match(context: np.ndarray, min_match: int, max_match: int, num_tokens: int) -> np.ndarray:
    """The tokens that followed the latest earlier occurrence of the context's longest
    suffix of min_match..max_match tokens: up to num_tokens of them, empty if none occurs.

    vLLM's n-gram matcher finds the same longest suffix but drafts from its earliest
    occurrence. The latest is the better guess: text repeats what it said last (a list's
    items, a refrain, an identifier's recent uses). Replayed over the target's held-out
    answers with the shipped draft, the latest gives 2.615 tokens per step against 2.480
    (results/training/README.md, "The latest occurrence").

    context [n] token ids -> [<= num_tokens] int32. e.g. min 2, max 4, num_tokens 2:
        context 5 7 1 5 7 2 5 7 (x_0 .. x_7): (2, 5, 7) never occurred before, (5, 7) did,
        ending at 1 and at 4; the latest, 4, was followed by x_5 x_6 -> [2, 5]
        (vLLM's matcher drafts what followed the earliest, x_2 x_3 -> [1, 5])
    """
    n = len(context)
    if n < min_match + 1 or num_tokens < 1:
        return np.empty(0, dtype=np.int32)
    context = np.asarray(context)
    # lengths[e], e = 0 .. n-2: how many of the tokens ending at e equal the context's last
    # ones, in a row (up to max_match); the suffix itself (e = n-1) is not an occurrence.
    lengths = np.zeros(n - 1, dtype=np.int64)  # [n-1]
    alive = np.ones(n - 1, dtype=bool)  # [n-1] tokens e-j+1 .. e all matched so far
    for j in range(min(max_match, n - 1)):
        alive[:j] = False  # an occurrence ending at e < j has no token j back
        alive[j:] &= context[:n - 1 - j] == context[n - 1 - j]  # x_{e-j} == x_{n-1-j}
        lengths += alive
    longest = int(lengths.max())
    if longest < min_match:
        return np.empty(0, dtype=np.int32)
    end = int(np.flatnonzero(lengths == longest)[-1])  # the latest of the longest
    return context[end + 1:end + 1 + num_tokens].astype(np.int32)


def lookup_matches(tokens: torch.Tensor, lengths: torch.Tensor, min_match: int) -> torch.Tensor:
    """Where the lookup has a match when the draft runs at position t.

    tokens [B, L] token ids, lengths [B] real lengths -> [B, L-1] bool. The draft at t runs
    on the context x_0 .. x_{t+1} (the target has just sampled x_{t+1}; head i drafts
    x_{t+2+i}), and the lookup matches there iff the `min_match` tokens ending at t+1 also
    end at some earlier index. Positions past a row's length are False.

    e.g. min_match 2, tokens [5, 7, 5, 7, 9]:
        t=0  context [5, 7]            suffix (5, 7) new        -> False
        t=1  context [5, 7, 5]         suffix (7, 5) new        -> False
        t=2  context [5, 7, 5, 7]      suffix (5, 7) ended at 1 -> True
        t=3  context [5, 7, 5, 7, 9]   suffix (7, 9) new        -> False
    """
    if min_match < 1:
        raise ValueError(f"min_match must be >= 1, got {min_match}")
    B, L = tokens.shape
    out = np.zeros((B, max(L - 1, 0)), dtype=bool)
    rows = tokens.detach().cpu().numpy()
    for b, n in enumerate(lengths.tolist()):
        if n < min_match:
            continue
        # windows[w] = x_w .. x_{w+m-1}, the m-gram ending at e = w + m - 1.
        windows = np.lib.stride_tricks.sliding_window_view(rows[b, :n], min_match)  # [n-m+1, m]
        _, first, inverse = np.unique(windows, axis=0, return_index=True, return_inverse=True)
        seen_before = first[inverse.reshape(-1)] < np.arange(len(windows))  # [n-m+1]
        ends = np.arange(min_match - 1, n)  # e, the context's last index; t = e - 1
        keep = ends >= 1
        out[b, ends[keep] - 1] = seen_before[keep]
    return torch.from_numpy(out).to(tokens.device)
