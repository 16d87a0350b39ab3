"""Replay chain drafting offline (scripts/replay_drafting.py): the walk vLLM's greedy chain
verification takes through an answer, with the heads' drafts from one teacher-forced pass
over the cached target outputs and the lookup's from a matcher passed in (the script passes
the proposer's own ContextLookup; this package never imports vLLM).

A step at t has the context x_0 .. x_{t+1} (the target has just sampled x_{t+1}) and drafts
x_{t+2} ..; the target accepts the leading drafts equal to its greedy tokens and samples one
more, so the next step is at t + accepted + 1. e.g. answer x_2 .. x_7, heads right twice
at t=1: accepted 2, next step at t=4, where x_6, x_7 are all that is left to draft.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_chimera.training import trainer
from vllm_chimera.training.settings import TrainingSettings


@dataclass
class Answer:
    tokens: np.ndarray  # [n] prompt and answer
    greedy: np.ndarray  # [n] the target's argmax at t (its x_{t+1})
    first: int  # index of the answer's first token
    end: int  # index of the last answer token replayed
    heads: dict  # {t: ([K] head drafts, [K] top-1 probabilities)} at every answer position


def teacher_forced_heads(settings: TrainingSettings, draft_dir: str, max_tokens: int) -> list[Answer]:
    """One validation pass of the draft over settings.val_data (chimera-train's cache and
    loss) keeping each answer position's head drafts; answers cut to max_tokens tokens."""
    loss_module, data, device = trainer.validation_setup(settings, draft_dir)
    if settings.draft_kind != "chimera":
        raise ValueError(f"the replay drafts with Chimera's heads; {draft_dir} is a {settings.draft_kind}")
    loss_module.eval()
    answers = []
    with torch.no_grad():
        for start in range(0, len(data), settings.micro_batch_size):
            batch = data.batch(list(range(start, min(start + settings.micro_batch_size, len(data)))), device)
            loss_module(batch)
            rows, positions = loss_module.last_selected.nonzero(as_tuple=True)  # [P] each
            drafts = loss_module.last_predictions.t().cpu().numpy()  # [P, K]
            probs = loss_module.last_top1_probs.t().cpu().numpy()  # [P, K]
            for b in range(batch["tokens"].shape[0]):
                n = int(batch["lengths"][b])
                response = np.nonzero(batch["mask"][b, :n].cpu().numpy())[0]
                mine = (rows == b).nonzero().flatten().tolist()
                answers.append(Answer(
                    tokens=batch["tokens"][b, :n].cpu().numpy(), greedy=batch["greedy"][b, :n].cpu().numpy(),
                    first=int(response[0]), end=min(int(response[-1]), int(response[0]) + max_tokens - 1),
                    heads={int(positions[i]): (drafts[i], probs[i]) for i in mine}))
    return answers


# -- the rules: (lookup's drafts, heads' drafts, heads' probabilities, context, lookup) -> drafts
def lookup_first(match, heads, probs, context, lookup):
    return match if len(match) else heads


def heads_only(match, heads, probs, context, lookup):
    return heads


def confident_heads(threshold):
    def rule(match, heads, probs, context, lookup):
        if len(match) and (probs[0] < threshold or match[0] == heads[0]):
            return match
        return heads
    return rule


def heads_then_lookup(match, heads, probs, context, lookup):
    if len(match):
        return match
    drafts = [int(heads[0])]
    more = lookup(np.concatenate([context, drafts]), len(heads) - 1)
    return drafts + more.tolist() if len(more) else heads


def replay(answers: list[Answer], rule, lookup) -> dict:
    """Walk each answer step by step as vLLM would: a step at t (context x_0..x_{t+1})
    drafts, the target accepts the leading drafts equal to its x_{t+2}.. and samples one
    more token, so the next step is at t + accepted + 1. Also per source (the lookup's
    steps: the rule drafted the lookup's match as is; the heads' steps: all others) the
    steps and those whose first draft was accepted, as vLLM's LookupStats books them."""
    num_steps = num_accepted = num_first = 0
    by_source = {"lookup": [0, 0], "heads": [0, 0]}  # [steps, first draft accepted]
    for a in answers:
        t = a.first - 1  # the first step: the target has just sampled the answer's first token
        while t + 2 <= a.end and t in a.heads:
            heads, probs = a.heads[t]
            context = a.tokens[:t + 2]
            match = lookup(context, len(heads))
            drafts = rule(match, heads, probs, context, lookup)
            truth = a.greedy[t + 1:a.end]  # x_{t+2} .. x_end
            accepted = 0
            while accepted < min(len(drafts), len(truth)) and drafts[accepted] == truth[accepted]:
                accepted += 1
            num_steps, num_accepted, num_first = num_steps + 1, num_accepted + accepted, num_first + (accepted > 0)
            source = by_source["lookup" if len(match) and drafts is match else "heads"]
            source[0], source[1] = source[0] + 1, source[1] + (accepted > 0)
            t += accepted + 1
    return {"num_steps": num_steps, "mean_acceptance_length": 1 + num_accepted / max(num_steps, 1),
            "first_position": num_first / max(num_steps, 1),
            **{f"{name}_steps": steps for name, (steps, _) in by_source.items()},
            **{f"{name}_first_accepted": hits for name, (_, hits) in by_source.items()}}


RULES = {"lookup-first": lookup_first, "heads-only": heads_only,
         **{f"confident-heads-{t}": confident_heads(t) for t in (0.5, 0.7, 0.9)},
         "heads-then-lookup": heads_then_lookup}
