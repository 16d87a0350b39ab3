"""Where the context lookup drafts, from the token ids alone.

Inside vLLM the proposer first asks the context lookup (`vllm_chimera/vllm/lookup.py`, vLLM's
own n-gram matcher) for each request's draft, and the heads draft only where it finds no
match. The matcher finds a match exactly when the context's last `min_match` tokens occur
earlier in the context (any earlier occurrence, overlapping the suffix or not; a longer
match contains this one). So a training run can tell which positions the heads will ever be
asked to draft at, and spend its budget there (`chimera-train --skip-lookup-matches`), and
validation can score the heads where they matter. Small models repeat themselves: the
lookup matches at 73% of the positions of SmolLM2's own answers to held-out ShareGPT
prompts and at 60% of its MT-bench answers' (validation's `lookup_misses` share;
results/training/README.md, "Where the heads draft").

`tests/test_vllm_lookup.py` checks this rule against vLLM's matcher.
"""
from __future__ import annotations

import numpy as np
import torch

# speculative_config["lookup"]["min_match"] when unset (LookupSettings reads it from here).
DEFAULT_MIN_MATCH = 2


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
