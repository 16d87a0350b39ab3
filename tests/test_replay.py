"""The offline drafting replay walks an answer as vLLM's greedy chain verification does."""
from __future__ import annotations

import numpy as np

from vllm_chimera.training.replay import (Answer, confident_heads, heads_only, heads_then_lookup,
                                          lookup_first, replay)

# Prompt x_0 x_1, answer x_2 .. x_7 = 12 .. 17; greedy[t] is x_{t+1}.
TOKENS = np.array([10, 11, 12, 13, 14, 15, 16, 17])
GREEDY = np.append(TOKENS[1:], 99)
SURE, UNSURE = np.full(4, 0.95), np.full(4, 0.1)


def answer(heads: dict) -> Answer:
    return Answer(tokens=TOKENS, greedy=GREEDY, first=2, end=7, heads=heads)


def no_lookup(context, max_tokens):
    return np.empty(0, dtype=np.int32)


def test_walk_steps_after_the_accepted_drafts_and_the_bonus_token():
    # t=1 (context ends at x_2): drafts x_3.. = 13 14 | wrong -> 2 accepted, next step t=4;
    # t=4: x_6, x_7 left to draft, both right -> 2 accepted, then t=7: nothing left.
    heads = {t: (np.array([0, 0, 0, 0]), SURE) for t in range(1, 7)}
    heads[1] = (np.array([13, 14, 0, 16]), SURE)
    heads[4] = (np.array([16, 17, 99, 5]), SURE)  # (99: greedy past the end, never drafted)
    result = replay([answer(heads)], heads_only, no_lookup)
    assert result == {"num_steps": 2, "mean_acceptance_length": 3.0, "first_position": 1.0,
                      "lookup_steps": 0, "heads_steps": 2,
                      "lookup_first_accepted": 0, "heads_first_accepted": 2}
    # Wrong first drafts: every step accepts nothing and moves one token (t = 1 .. 5).
    wrong = {t: (np.array([0, 0, 0, 0]), SURE) for t in range(1, 7)}
    assert replay([answer(wrong)], heads_only, no_lookup) == {
        "num_steps": 5, "mean_acceptance_length": 1.0, "first_position": 0.0,
        "lookup_steps": 0, "heads_steps": 5, "lookup_first_accepted": 0, "heads_first_accepted": 0}


def test_rules_choose_between_lookup_and_heads():
    heads = {t: (np.array([0, 0, 0, 0]), SURE) for t in range(1, 7)}
    heads[1] = (np.array([13, 0, 0, 0]), UNSURE)

    def lookup(context, max_tokens):  # matches once, with the answer's next four tokens
        return np.array([13, 14, 15, 16])[:max_tokens] if len(context) == 3 else no_lookup(context, max_tokens)

    assert lookup_first(lookup(TOKENS[:3], 4), *heads[1], TOKENS[:3], lookup).tolist() == [13, 14, 15, 16]
    assert replay([answer(heads)], lookup_first, lookup)["num_steps"] == 1  # 4 accepted: t=6, done
    assert replay([answer(heads)], heads_only, lookup)["num_steps"] == 4  # t = 1, 3, 4, 5
    # The lookup's step (t=1, right) and the heads' after its 4 tokens: by source.
    wrong_after = {**heads, 1: (np.array([0, 0, 0, 0]), UNSURE)}
    result = replay([answer(wrong_after)], lookup_first, lookup)
    assert (result["lookup_steps"], result["lookup_first_accepted"]) == (1, 1)
    assert (result["heads_steps"], result["heads_first_accepted"]) == (0, 0)
    # A sure head 0 that disagrees overrides the lookup; an unsure one, or one that agrees, not.
    sure_wrong = {**heads, 1: (np.array([7, 0, 0, 0]), SURE)}
    rule = confident_heads(0.9)
    assert replay([answer(sure_wrong)], rule, lookup)["num_steps"] == 5
    assert replay([answer(heads)], rule, lookup)["num_steps"] == 1


def test_heads_then_lookup_continues_from_head_zero():
    heads = {t: (np.array([0, 0, 0, 0]), SURE) for t in range(1, 7)}
    heads[1] = (np.array([13, 0, 0, 0]), SURE)
    seen = []

    def lookup(context, max_tokens):
        seen.append((context.tolist(), max_tokens))
        return np.array([14, 15, 16]) if context.tolist() == [10, 11, 12, 13] else no_lookup(context, max_tokens)

    assert heads_then_lookup(no_lookup(None, 4), *heads[1], TOKENS[:3], lookup) == [13, 14, 15, 16]
    assert seen == [([10, 11, 12, 13], 3)]
    assert replay([answer(heads)], heads_then_lookup, lookup)["num_steps"] == 1
