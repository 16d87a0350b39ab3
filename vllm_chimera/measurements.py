"""What was measured of a draft on a kind of machine: beside its config.json, never in it.

A draft's config.json (ChimeraConfig) is its design, the same everywhere. What pays at run
time depends on the machine as well: at which batch sizes drafting beats plain decoding,
what a step that verifies n tokens costs, whether a token tree beats the chain. Those
figures live in `measurements.json` in the draft's folder, one entry per device type
(vLLM's `current_platform.device_type`: "cpu", "cuda", ...), e.g.

    {"cpu": {"step_aside_schedule": [[1, 1, 4], [2, 3, 1], [4, 4, 0]]}}

Only the measuring commands write it (save_measurements): `chimera-bench --save-schedule`
(the step-aside schedule), `chimera-bench --measure-tree --save-schedule` (the tree fields)
and `export_draft(..., step_aside_schedules=...)`, by which a recipe carries a schedule
over to the draft it ships. Saving new weights (checkpoint.save_draft) removes the file: its
figures described other weights. Where a device type has no entry, vLLM runs the draft with
conservative defaults (vllm/spec_config.py) and says so once.

Drafts saved before this file existed carry the same figures inside config.json
(ChimeraConfig.MEASURED_FIELDS, each keyed by device type but the accuracies): they are
read from there where measurements.json lacks them, and the next save_measurements moves
them into measurements.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from transformers.utils import CONFIG_NAME

from vllm_chimera.config import ChimeraConfig

MEASUREMENTS_NAME = "measurements.json"


@dataclass(frozen=True)
class DeviceMeasurements:
    """One device type's measurements of one draft (None: not measured).

    step_aside_schedule: the heads' K per batch size, [[from, to, K], ...]: vLLM's
        `num_speculative_tokens_per_batch_size` format (inclusive ranges from batch size 1,
        the last K carries on; 0 = no drafting, plain decoding). Used when the user fixes
        no K. e.g. [[1, 1, 2], [2, 4, 1], [5, 16, 0]]: 2 tokens for a lone request, 1 for
        2-4 concurrent ones, none from 5 on.
    head_top_k_accuracies: [num_heads][top_k], how often head i's rank-r candidate was the
        target's token when the path before it was accepted (tree "auto" builds its tree
        from them).
    tree_step_seconds: {"n": seconds} of a batch-1 decoding step that verifies n tokens.
    tree_schedule: the tree's size (nodes, 0 = the chain) per batch size, in the step-aside
        schedule's format.
    """

    step_aside_schedule: list[list[int]] | None = None
    head_top_k_accuracies: list[list[float]] | None = None
    tree_step_seconds: dict[str, float] | None = None
    tree_schedule: list[list[int]] | None = None

    def problems(self, num_heads: int) -> list[str]:
        """What is wrong with these figures for a draft with `num_heads` heads."""
        problems = []
        for name, max_value in (("step_aside_schedule", num_heads), ("tree_schedule", 1 << 30)):
            schedule = getattr(self, name)
            problem = None if schedule is None else schedule_problem(schedule, max_value)
            if problem:
                problems.append(f"{name}: {problem}")
        accuracies = self.head_top_k_accuracies
        if accuracies is not None and not (
                isinstance(accuracies, list) and 0 < len(accuracies) <= num_heads
                and all(isinstance(a, list) and a and all(0 <= x <= 1 for x in a) for a in accuracies)):
            problems.append(f"head_top_k_accuracies must be one non-empty list of "
                            f"probabilities per head (at most {num_heads}), got {accuracies!r}")
        seconds = self.tree_step_seconds
        if seconds is not None and not (
                isinstance(seconds, dict) and seconds
                and all(str(n).isdigit() and isinstance(s, (int, float)) and s > 0
                        for n, s in seconds.items())):
            problems.append(f"tree_step_seconds must map verified token counts to positive "
                            f"seconds, got {seconds!r}")
        return problems

    def to_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


FIELDS = tuple(f.name for f in fields(DeviceMeasurements))


def schedule_problem(schedule, max_value: int) -> str | None:
    """What is wrong with a value-per-batch-size schedule ([[start, end, value], ...]), or None.

    The ranges must start at batch size 1, be sorted and not overlap; 0 <= value <= max_value.
    """
    if not isinstance(schedule, list) or not schedule:
        return f"must be a non-empty list of [start, end, K], got {schedule!r}"
    previous_end = 0
    for entry in schedule:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 3
                or not all(isinstance(v, int) for v in entry)):
            return f"each entry must be [start, end, K] integers, got {entry!r}"
        start, end, value = entry
        first = previous_end == 0
        if (first and start != 1) or (not first and start <= previous_end) or start > end:
            return f"ranges must start at 1, be sorted and not overlap, got {schedule!r}"
        if not 0 <= value <= max_value:
            return f"K must be in 0..{max_value} (the draft's heads), got {entry!r}"
        previous_end = end
    return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _from_config_json(config: dict) -> dict[str, dict]:
    """The measured fields an older config.json carries, as {device type: {field: value}}.

    Its accuracies had no device type: they go with each device whose tree step times were
    measured (one `--measure-tree` run measured both); without any, they are dropped (tree
    "auto" needs both)."""
    devices: dict[str, dict] = {}
    for old, new in (("step_aside_schedules", "step_aside_schedule"),
                     ("tree_step_seconds", "tree_step_seconds"), ("tree_schedules", "tree_schedule")):
        for device_type, value in (config.get(old) or {}).items():
            devices.setdefault(device_type, {})[new] = value
    accuracies = config.get("head_top_k_accuracies")
    for device_type in (config.get("tree_step_seconds") or {}):
        if accuracies:
            devices[device_type]["head_top_k_accuracies"] = accuracies
    return devices


def load_measurements(draft_dir: str | os.PathLike) -> dict[str, DeviceMeasurements]:
    """{device type: its measurements} of the draft in `draft_dir` ({} where none).

    measurements.json first, then whatever an older config.json still carries that it lacks.
    Raises ValueError (naming the file) on figures that do not fit the draft."""
    draft_dir = Path(draft_dir)
    config = _read_json(draft_dir / CONFIG_NAME)
    devices = _from_config_json(config)
    path = draft_dir / MEASUREMENTS_NAME
    if path.is_file():
        for device_type, values in _read_json(path).items():
            if not isinstance(values, dict) or set(values) - set(FIELDS):
                raise ValueError(f"{path}: {device_type!r} must map some of {FIELDS} to their "
                                 f"values, got {values!r}")
            devices.setdefault(device_type, {}).update(values)
    measured = {device_type: DeviceMeasurements(**values) for device_type, values in devices.items()}
    num_heads = _num_heads(config)
    problems = [f"{device_type!r} {problem}" for device_type, m in measured.items()
                for problem in m.problems(num_heads)]
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return measured


def _num_heads(config: dict) -> int:
    """The number of decoding heads of the draft whose config.json holds `config`."""
    return ChimeraConfig.from_dict(config).num_decoding_heads


def save_measurements(draft_dir: str | os.PathLike, device_type: str, **values) -> Path:
    """Store measured `values` (DeviceMeasurements fields) for `device_type` in the draft's
    measurements.json, keeping the other fields and devices; returns the file's path.

    Checked before anything is written (ValueError). Measurements an older config.json still
    carries are moved: into measurements.json, out of config.json."""
    draft_dir = Path(draft_dir)
    measured = load_measurements(draft_dir)
    measured[device_type] = replace(measured.get(device_type, DeviceMeasurements()), **values)
    config = _read_json(draft_dir / CONFIG_NAME)
    problems = measured[device_type].problems(_num_heads(config))
    if problems:
        raise ValueError(f"measurements of {draft_dir} on {device_type!r}: " + "; ".join(problems))
    path = draft_dir / MEASUREMENTS_NAME
    _write_json(path, {d: m.to_dict() for d, m in sorted(measured.items()) if m.to_dict()})
    if any(name in config for name in ChimeraConfig.MEASURED_FIELDS):
        _write_json(draft_dir / CONFIG_NAME,
                    {k: v for k, v in config.items() if k not in ChimeraConfig.MEASURED_FIELDS})
    return path


def remove_measurements(draft_dir: str | os.PathLike) -> None:
    """Forget what was measured of the weights in `draft_dir` (new weights are going there)."""
    (Path(draft_dir) / MEASUREMENTS_NAME).unlink(missing_ok=True)


def _write_json(path: Path, value: dict) -> None:
    # Through a temporary name, so that an interrupted write never leaves a torn file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
