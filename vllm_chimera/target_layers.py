"""The target's intermediate layers as draft inputs (EAGLE-3's lesson, arXiv 2503.01840).

The target's final-normed hidden state h_t is shaped for one job, predicting x_{t+1}; what
the draft must predict (x_{t+2} ..) is easier to read from the residual stream lower down.
A draft with `target_layer_ids` also reads the residual stream at those layers.

"Layer i" means what vLLM's EAGLE-3 aux hidden states mean (EagleModelMixin): the residual
stream after i decoder layers, i.e. the input of layer i (0 = the token embeddings).
e.g. a 30-layer target with target_layer_ids (2, 15, 27) hands the draft the inputs of
layers 2, 15 and 27 at each position: [num_tokens, 3 * d]. Inside vLLM the proposer asks
for the same layers plus layer 30 (the final stream before the final norm, from which it
recomputes h_t: the runner then hands it only these states).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def default_target_layer_ids(num_layers: int) -> tuple[int, ...]:
    """vLLM's EAGLE-3 default (get_eagle3_default_aux_hidden_state_layers): low, middle, high."""
    return (2, num_layers // 2, num_layers - 3)


def target_layer_ids_problem(layer_ids, num_layers: int | None) -> str | None:
    """What is wrong with target_layer_ids for a target of num_layers layers, or None.
    They must be distinct, ascending (vLLM returns aux states in layer order) and below
    num_layers (layer num_layers is h_t's own stream, which the draft reads anyway)."""
    if (not isinstance(layer_ids, (list, tuple)) or not layer_ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layer_ids)):
        return f"must be a non-empty list of layer numbers, got {layer_ids!r}"
    if list(layer_ids) != sorted(set(layer_ids)) or layer_ids[0] < 0:
        return f"must be distinct, ascending and >= 0, got {list(layer_ids)}"
    if num_layers is not None and layer_ids[-1] >= num_layers:
        return f"must be below the target's {num_layers} layers, got {list(layer_ids)}"
    return None


def decoder_layers(target: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (Llama family: base_model.layers)."""
    layers = getattr(target.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(target).__name__}: no decoder layers at base_model.layers, "
                         "so its intermediate layers cannot feed a draft")
    return layers


@contextlib.contextmanager
def capture_layer_inputs(target: nn.Module, layer_ids):
    """While active, each forward of the (Hugging Face) target appends the inputs of the
    decoder layers `layer_ids` to the yielded list, as one [B, L, len(layer_ids) * d] tensor.

    with capture_layer_inputs(target, (2, 15, 27)) as captured:
        target.base_model(input_ids=ids)
    features = captured[-1]  # [B, L, 3 * d]
    """
    layers = decoder_layers(target)
    problem = target_layer_ids_problem(layer_ids, len(layers))
    if problem:
        raise ValueError(f"target_layer_ids {problem}")
    captured, current = [], {}

    def hook(index):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, L, d]
            current[index] = hidden.detach()
            if len(current) == len(layer_ids):  # the last one of this forward
                captured.append(torch.cat([current.pop(i) for i in layer_ids], dim=-1))
        return record

    handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layer_ids]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
