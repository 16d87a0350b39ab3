"""Resumable training checkpoints: the draft (via save_trained_draft) + the trainer's state.

    <output_dir>/checkpoint/draft/            config.json + model.safetensors (save_draft, or
                                              a peer's vLLM export)
    <output_dir>/checkpoint/trainer_state.pt  optimizer, scheduler, step, RNG states, history

A checkpoint is written beside the old one and swapped in by renames, so an interruption
during a save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm_chimera.checkpoint import load_draft, save_draft
from vllm_chimera.measurements import DeviceMeasurements, load_measurements, save_measurements
from vllm_chimera.model import ChimeraDraftModel
from vllm_chimera.training.peers import PeerDraft

STATE_NAME = "trainer_state.pt"
# Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"stop_at_step", "resume", "progress", "num_threads", "device",
                     "save_every", "eval_every", "cache_dir",
                     # A run may continue on a machine with or without native bf16 (its
                     # training labels then come from the other precision: 99.4% the same).
                     "autocast", "cache_precision"}
SETTINGS_ADDED_LATER = {"draft_kind": "chimera",  # setting -> the value older runs had
                        "loss_positions_fraction": None, "autocast": "auto",
                        "cache_precision": "fp32", "kl_weight": 0.0, "regression_weight": 0.0,
                        "init_from": None, "skip_lookup_matches": None}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    history: list = field(default_factory=list)  # one dict per logged step or validation
    train_seconds: float = 0.0  # wall time spent in training steps, over all sessions
    # This process's CPU time in training steps (time.process_time: all its threads), over
    # all sessions: the budget recipes are compared at, as wall time is not on a shared machine.
    train_cpu_seconds: float = 0.0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trained_draft(draft: ChimeraDraftModel | PeerDraft, folder: Path) -> Path:
    """A Chimera draft as save_draft writes it; a Medusa/EAGLE peer as vLLM's loader reads it."""
    if isinstance(draft, PeerDraft):
        return draft.export(folder)
    return save_draft(draft, folder)


def save_checkpoint(folder: Path, draft: ChimeraDraftModel | PeerDraft, optimizer, scheduler,
                    state: TrainState, settings: dict) -> None:
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_trained_draft(draft, tmp / "draft")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": state.step, "history": state.history, "train_seconds": state.train_seconds,
                "train_cpu_seconds": state.train_cpu_seconds, "rng": rng_state(),
                "settings": settings}, tmp / STATE_NAME)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, draft: ChimeraDraftModel | PeerDraft, optimizer, scheduler,
                    settings: dict) -> TrainState:
    """Restore everything saved by save_checkpoint into the given objects; returns the state.

    Refuses a checkpoint made with different training settings (other than those in
    RESUMABLE_CHANGES): continuing it would silently train something else.
    """
    if not (folder / STATE_NAME).is_file() and folder.with_name(folder.name + ".old").is_dir():
        folder = folder.with_name(folder.name + ".old")  # interrupted between the two renames
    saved = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False)
    # Checkpoints from before a setting existed were made with its default.
    saved["settings"] = {**SETTINGS_ADDED_LATER, **saved["settings"]}
    changed = sorted(k for k in set(settings) | set(saved["settings"])
                     if k not in RESUMABLE_CHANGES and settings.get(k) != saved["settings"].get(k))
    if changed:
        raise ValueError(f"cannot resume from {folder}: settings changed since it was saved: "
                         + ", ".join(f"{k} {saved['settings'].get(k)!r} -> {settings.get(k)!r}"
                                     for k in changed)
                         + " (use another output directory, or --no-resume to start over)")
    if isinstance(draft, PeerDraft):
        draft.load_exported(folder / "draft")
    else:
        draft.load_state_dict(load_draft(folder / "draft").state_dict())
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return TrainState(step=saved["step"], history=saved["history"],
                      train_seconds=saved.get("train_seconds", 0.0),
                      train_cpu_seconds=saved.get("train_cpu_seconds", 0.0))


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE_NAME).is_file() or (folder.with_name(folder.name + ".old") / STATE_NAME).is_file()


def export_draft(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16,
                 step_aside_schedules: dict[str, list[list[int]]] | None = None) -> Path:
    """Copy a trained draft to `dst` with its weights cast to `dtype` (half the size in fp16).

    The draft was trained in fp32; fp16 keeps its predictions (it only feeds the target's
    LM head) while halving the checkpoint shipped in the repo. `step_aside_schedules`
    ({device type: schedule}), if given, go to its measurements.json (schedules are measured
    by chimera-bench, not trained); nothing else measured is carried over.
    """
    draft = load_draft(src)
    for device_type, schedule in (step_aside_schedules or {}).items():  # (before any write)
        problems = DeviceMeasurements(step_aside_schedule=schedule).problems(
            draft.config.num_decoding_heads)
        if problems:
            raise ValueError(f"step_aside_schedules[{device_type!r}]: " + "; ".join(problems))
    save_draft(draft.to(dtype), dst)
    for device_type, schedule in (step_aside_schedules or {}).items():
        save_measurements(dst, device_type, step_aside_schedule=schedule)
    return Path(dst)


def export_draft_keeping_schedules(src: str | Path, dst: str | Path,
                                   schedules_from: str | Path | None = None,
                                   dtype: torch.dtype = torch.float16) -> dict:
    """export_draft, carrying the step-aside schedules measured for the draft in
    `schedules_from` (e.g. the shipped draft a new one replaces; they are measured by
    chimera-bench, not trained, so re-measure them for the new draft). Returns the schedules
    kept, {device type: schedule}."""
    measured = (load_measurements(schedules_from)
                if schedules_from and Path(schedules_from, "config.json").is_file() else {})
    kept = {device: m.step_aside_schedule for device, m in measured.items() if m.step_aside_schedule}
    export_draft(src, dst, dtype, step_aside_schedules=kept)
    print(f"exported {src} -> {dst}" + (f"; kept the step-aside schedules of {schedules_from}, "
          f"{kept}: re-measure them for this draft with chimera-bench --save-schedule"
          if kept else ""), flush=True)
    return kept


def average_into(draft_dirs: list[str], weights: list[float] | None, target_config,
                 out: str | Path) -> Path:
    """average_drafts, written as OUTPUT/draft with OUTPUT/average.json (what was averaged)."""
    draft = average_drafts(draft_dirs, weights, target_config)
    out = Path(out)
    save_draft(draft, out / "draft")
    record = {"drafts": [str(d) for d in draft_dirs],
              "weights": list(weights) if weights else [1.0] * len(draft_dirs)}
    (out / "average.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"averaged {len(draft_dirs)} drafts -> {out / 'draft'}", flush=True)
    return out / "draft"


def average_drafts(draft_dirs: list[str | Path], weights: list[float] | None = None,
                   target_config=None) -> ChimeraDraftModel:
    """The weighted mean of several saved drafts' weights, as one fp32 draft (a "model soup",
    Wortsman et al. 2022, arXiv 2203.05482).

    Drafts continued from one saved draft on different data stay in one basin of the loss, so
    their mean is a working draft too; on SmolLM2 it generalised a little past each of them
    on held-out ShareGPT answers, not on MT-bench (results/training/README.md, "Averaging
    drafts"). `weights` (default: equal) are normalised to sum to 1.

    Refused unless every draft has the same design (the config, measured fields aside) and
    the same reduced vocabulary (a row of the LM head must be the same token in each), and,
    with `target_config`, unless each was trained for that target. Nothing measured of the
    drafts goes with the result (it is a draft of its own).
    """
    if len(draft_dirs) < 2:
        raise ValueError(f"averaging needs at least two drafts, got {len(draft_dirs)}")
    weights = [1.0] * len(draft_dirs) if weights is None else list(weights)
    if len(weights) != len(draft_dirs) or not all(w > 0 for w in weights):
        raise ValueError(f"need one positive weight per draft: {len(draft_dirs)} drafts, "
                         f"weights {weights}")
    drafts = [load_draft(d, target_config).float() for d in draft_dirs]
    first, design = drafts[0], drafts[0].config.to_dict()
    for folder, draft in zip(draft_dirs[1:], drafts[1:]):
        changed, other = first.config.design_differences(draft.config), draft.config.to_dict()
        if changed:
            raise ValueError(f"{folder} is not the design of {draft_dirs[0]}: "
                             + ", ".join(f"{k} {other.get(k)!r} (first: {design.get(k)!r})"
                                         for k in changed))
    total = sum(weights)
    states = [d.state_dict() for d in drafts]
    averaged = {}
    for name, tensor in states[0].items():
        if not tensor.is_floating_point():  # the vocabulary map: equal, or no soup
            for folder, state in zip(draft_dirs[1:], states[1:]):
                if not torch.equal(state[name], tensor):
                    raise ValueError(f"{folder} has another {name} than {draft_dirs[0]} "
                                     "(another reduced vocabulary): its rows mean other tokens")
            averaged[name] = tensor
        else:
            averaged[name] = sum(w / total * state[name] for w, state in zip(weights, states))
    first.load_state_dict(averaged)
    return first
