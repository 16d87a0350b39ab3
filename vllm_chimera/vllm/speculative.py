"""Turning a user's speculative settings into a Chimera draft: detection, discovery, checks.

Chimera is requested by any of:
    method="chimera"                       (--spec-method chimera, --speculative-config)
    model="chimera"                        (--speculative-model chimera: find the draft)
    model=DIR with config.json model_type "chimera", method unset (detected)
Everything here runs at configuration time in the front end, so a bad draft fails
before any engine process starts.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from vllm_chimera.checkpoint import DRAFT_SUBDIR, ChimeraCheckpointError, load_draft
from vllm_chimera.config import ChimeraConfig

METHOD = "chimera"
DRAFT_ENV = "VLLM_CHIMERA_DRAFT"  # a VLLM_ name, so vLLM forwards it to its workers

logger = logging.getLogger(__name__)


def is_chimera_dir(path: str | os.PathLike | None) -> bool:
    """True iff `path` is a local folder whose config.json says model_type "chimera"."""
    if not path or not isinstance(path, (str, os.PathLike)):
        return False
    config_path = Path(path) / "config.json"
    try:
        return json.loads(config_path.read_text()).get("model_type") == METHOD
    except (OSError, ValueError, AttributeError):
        return False


def chimera_requested(method: str | None, model: str | None) -> bool:
    if method == METHOD or model == METHOD:
        return True
    return method in (None, "draft_model") and is_chimera_dir(model)


def chimera_engine(vllm_config) -> bool:
    """True iff this engine's speculative method is chimera (after resolution)."""
    spec = vllm_config.speculative_config
    return spec is not None and spec.method == METHOD


def find_draft_for_target(target_model: str) -> Path:
    """The draft for a target when the user said only "chimera".

    Search order: $VLLM_CHIMERA_DRAFT, then <target dir>/chimera/, then <target dir>-chimera/.
    """
    candidates = []
    if os.environ.get(DRAFT_ENV):
        candidates.append(Path(os.environ[DRAFT_ENV]))
    target_dir = Path(target_model)
    candidates += [target_dir / DRAFT_SUBDIR, target_dir.with_name(target_dir.name + "-chimera")]
    for candidate in candidates:
        if is_chimera_dir(candidate):
            return candidate
    raise ChimeraCheckpointError(
        f"no Chimera draft found for target {target_model!r}; looked in: "
        + ", ".join(str(c) for c in candidates)
        + f". Pass the draft folder (--spec-model DIR or speculative_config "
          f"{{'model': DIR}}), or set {DRAFT_ENV}.")


def resolve_chimera(model: str | None, num_speculative_tokens: int | None,
                    target_model: str, target_hf_config, device_type: str = "cpu",
                    schedule_given: bool = False) -> tuple[str, int, list | None]:
    """Check the draft against the target and pick K: returns (draft_dir, K, schedule).

    Loads the draft's weights once on CPU so that a corrupt file, unknown weights or a
    draft trained for another target are reported here, with the checkpoint loader's
    message, rather than from inside an engine worker.

    With no K from the user (and no schedule of theirs), the draft's measured step-aside
    schedule for this device type is returned, with K its largest entry (at least 1: vLLM
    needs one); without one for this device, K is all the draft's heads and the schedule
    None. A K from the user means exactly that K at every batch size.
    """
    draft_dir = find_draft_for_target(target_model) if model in (None, METHOD) else Path(model)
    config: ChimeraConfig = load_draft(draft_dir, target_hf_config).config
    num_heads = config.num_decoding_heads
    schedule = None
    if num_speculative_tokens is None:
        if not schedule_given:
            schedule = (config.step_aside_schedules or {}).get(device_type)
        if schedule is not None:
            num_speculative_tokens = max(1, max(k for _, _, k in schedule))
            logger.info("chimera: the draft's step-aside schedule for %s (batch from, to, K): "
                        "%s; give num_speculative_tokens for a fixed K", device_type, schedule)
        else:
            num_speculative_tokens = num_heads
    if not 1 <= num_speculative_tokens <= num_heads:
        raise ValueError(
            f"num_speculative_tokens={num_speculative_tokens} is out of range for the Chimera "
            f"draft {draft_dir}: it has {num_heads} decoding heads, so K must be in 1..{num_heads}")
    return str(draft_dir), num_speculative_tokens, schedule


# -- The context lookup (speculative_config["lookup"]) ------------------------------------
@dataclass(frozen=True)
class LookupSettings:
    """Drafting from the request's own text: where the last `min_match`..`max_match` tokens
    occurred before in the request (prompt and output), propose the `num_tokens` tokens that
    followed them instead of the heads' tokens (vLLM's n-gram matcher finds the longest
    such match). Where there is no match the heads draft as without the lookup.
    """

    min_match: int = 2
    max_match: int = 4
    num_tokens: int = 4  # tokens drafted from a match (the heads' K applies elsewhere)

    @classmethod
    def parse(cls, value) -> "LookupSettings | None":
        """speculative_config["lookup"]: None or True (defaults), False (off), or a dict of
        the fields above. Raises ValueError naming what is wrong."""
        if value is None or value is True:
            return cls()
        if value is False:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"chimera: 'lookup' must be true, false or a dict with keys "
                             f"{LOOKUP_KEYS}, got {value!r}")
        unknown = sorted(set(value) - set(LOOKUP_KEYS))
        if unknown:
            raise ValueError(f"chimera: unknown 'lookup' settings {unknown}; known: {LOOKUP_KEYS}")
        for key, number in value.items():
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"chimera: lookup {key} must be a positive integer, "
                                 f"got {number!r}")
        settings = replace(cls(), **value)
        if settings.min_match > settings.max_match:
            raise ValueError(f"chimera: lookup min_match={settings.min_match} must be <= "
                             f"max_match={settings.max_match}")
        return settings

    def to_dict(self) -> dict:
        return asdict(self)


LOOKUP_KEYS = tuple(f.name for f in fields(LookupSettings))
