"""Save and load Chimera drafts: the one checkpoint loader everything uses.

Layout (the usual Hugging Face one): `config.json` (a ChimeraConfig: the design) +
`model.safetensors` (the draft's own weights only; the target's embedding and LM head are
not duplicated), and `measurements.json` once something was measured of it (measurements.py).
Every way a checkpoint can be wrong raises `ChimeraCheckpointError` saying what is wrong.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from vllm_chimera.config import ChimeraConfig
from vllm_chimera.measurements import remove_measurements
from vllm_chimera.model import ChimeraDraftModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Drafts shipped inside the package (fp16), by the prepared target they were trained for
# (vllm_chimera.prepare.targets.TARGETS); results/training/ says how each was made.
SHIPPED_DRAFTS = {"smollm2": Path(__file__).parent / "drafts" / "smollm2-chimera"}
# <target dir>/chimera is where `--speculative-model chimera` looks for a target's draft
# (chimera-prepare target links the shipped draft there).
DRAFT_SUBDIR = "chimera"


class ChimeraCheckpointError(ValueError):
    """A draft checkpoint that cannot be used (missing, corrupt, or for another target)."""


def save_draft(model: ChimeraDraftModel, save_dir: str | os.PathLike) -> Path:
    """Write the draft's config.json and weights; measurements of earlier weights saved
    there are removed (they do not describe these)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    remove_measurements(save_dir)
    model.config.save_pretrained(save_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Write to a temporary name first so an interrupted save never leaves a torn file.
    tmp = save_dir / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "model_type": "chimera"})
    os.replace(tmp, save_dir / WEIGHTS_NAME)
    return save_dir


def load_config(draft_dir: str | os.PathLike) -> ChimeraConfig:
    draft_dir = Path(draft_dir)
    if not draft_dir.is_dir():
        raise ChimeraCheckpointError(f"Chimera draft directory not found: {draft_dir}")
    config_path = draft_dir / CONFIG_NAME
    if not config_path.is_file():
        raise ChimeraCheckpointError(f"{draft_dir} has no {CONFIG_NAME}: not a Chimera draft")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ChimeraCheckpointError(f"{config_path} is not valid JSON: {e}") from e
    if raw.get("model_type") != "chimera":
        raise ChimeraCheckpointError(
            f"{config_path} has model_type={raw.get('model_type')!r}, expected 'chimera' "
            "(is this the target model's folder rather than the draft's?)")
    try:
        return ChimeraConfig.from_pretrained(draft_dir)
    except ValueError as e:
        raise ChimeraCheckpointError(f"{config_path}: {e}") from e


def check_target(config: ChimeraConfig, target_config: PretrainedConfig, draft_dir="draft") -> None:
    mismatches = config.target_mismatches(target_config)
    if mismatches:
        raise ChimeraCheckpointError(
            f"Chimera draft {draft_dir} was trained for another target: " + "; ".join(mismatches))


def load_draft(draft_dir: str | os.PathLike, target_config: PretrainedConfig | None = None,
               device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> ChimeraDraftModel:
    """Load a draft; with `target_config`, refuse it if it was trained for another target.

    The returned model is not bound to a target yet: call `bind_target` (or use
    `load_draft_for_target`).
    """
    config = load_config(draft_dir)
    if target_config is not None:
        check_target(config, target_config, draft_dir)
    weights_path = Path(draft_dir) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ChimeraCheckpointError(f"{draft_dir} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ChimeraCheckpointError(f"{weights_path} is corrupt or unreadable: {e}") from e
    model = ChimeraDraftModel(config)
    _check_state_dict(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def _check_state_dict(model: ChimeraDraftModel, state: dict, weights_path: Path) -> None:
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing weights {missing}")
    if unexpected:
        problems.append(f"unknown weights {unexpected}")
    for name in sorted(set(expected) & set(state)):
        if expected[name].shape != state[name].shape:
            problems.append(f"{name} has shape {tuple(state[name].shape)}, "
                            f"the config implies {tuple(expected[name].shape)}")
        elif state[name].is_floating_point() and not torch.isfinite(state[name]).all():
            problems.append(f"{name} contains NaN or infinite values")
    if problems:
        raise ChimeraCheckpointError(f"{weights_path} does not match its config: " + "; ".join(problems))


def target_embed_and_lm_head(target: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding table and LM head weight (both [V, d]) of a Hugging Face causal LM."""
    return target.get_input_embeddings().weight, target.get_output_embeddings().weight


def load_draft_for_target(draft_dir: str | os.PathLike, target: torch.nn.Module) -> ChimeraDraftModel:
    """Load a draft, check it against a Hugging Face target, and bind it to that target."""
    param = next(target.parameters())
    draft = load_draft(draft_dir, target.config, device=param.device, dtype=param.dtype)
    return draft.bind_target(*target_embed_and_lm_head(target))
