"""Chimera's speculative_config settings: parsed, checked and resolved against the draft.

Detection (is Chimera asked for?), draft discovery, K and the step-aside schedule, and the
settings Chimera adds to vLLM's SpeculativeConfig (lookup, min_confidence, tree,
max_deferred_rows).

Chimera is requested by any of:
    method="chimera"                       (--spec-method chimera, --speculative-config)
    model="chimera"                        (--speculative-model chimera: find the draft)
    model=DIR with config.json model_type "chimera", method unset (detected)
Everything here runs at configuration time in the front end, so a bad draft fails
before any engine process starts.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from vllm.logger import init_logger

from vllm_chimera.checkpoint import DRAFT_SUBDIR, ChimeraCheckpointError, load_draft
from vllm_chimera.config import ChimeraConfig
from vllm_chimera.context_lookup import CHOICES, DEFAULT_MIN_MATCH, OCCURRENCES
from vllm_chimera.measurements import DeviceMeasurements, load_measurements
from vllm_chimera.tree import TokenTree, best_paths, best_tree

METHOD = "chimera"
DRAFT_ENV = "VLLM_CHIMERA_DRAFT"  # a VLLM_ name, so vLLM forwards it to its workers

logger = init_logger(__name__)  # (warning_once: the config is resolved more than once)


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


@dataclass(frozen=True)
class ResolvedDraft:
    """The draft a speculative_config resolved to: its design and what was measured of it
    on this device type (an empty DeviceMeasurements where nothing was)."""

    directory: Path
    config: ChimeraConfig
    measured: DeviceMeasurements


def default_step_aside_schedule(num_heads: int) -> list[list[int]]:
    """The step-aside schedule of a draft not measured on this device type: all the heads
    for a lone request, one head for 2-3 concurrent ones, none from 4 on (plain decoding)."""
    # Conservative, from the one machine measured (SmolLM2 on a 2-core CPU, where a verified
    # token costs the most): all 4 heads gained 1.37-1.59x at batch 1, one head 1.56x at
    # batch 2 and 1.12x at batch 3, while at batch 4 every K (and n-gram) lost to plain
    # decoding (0.82-0.97x) and 4 heads at batch 16 ran at 0.55x (results/bench/README.md:
    # smollm2-self-prompts-unseen, smollm2-batch3, smollm2-layers-skiplookup,
    # smollm2-kl3-new6261-batch1). A GPU verifies more tokens per step for free, so it may
    # gain at larger batches too: `chimera-bench --save-schedule` measures where.
    return [[1, 1, num_heads], [2, 3, 1], [4, 4, 0]]


def _warn_unmeasured(draft: ResolvedDraft, device_type: str, default: str, command: str) -> None:
    logger.warning_once(f"chimera: nothing measured of the draft {draft.directory} on "
                        f"{device_type!r}: {default} (a conservative default; "
                        f"`{command}` measures this machine's)")


def resolve_chimera(model: str | None, num_speculative_tokens: int | None,
                    target_model: str, target_hf_config, device_type: str = "cpu",
                    schedule_given: bool = False) -> tuple[str, int, list | None, ResolvedDraft]:
    """Check the draft against the target and pick K: returns (draft_dir, K, schedule, the
    resolved draft).

    Loads the draft's weights once on CPU so that a corrupt file, unknown weights or a
    draft trained for another target are reported here, with the checkpoint loader's
    message, rather than from inside an engine worker.

    With no K from the user (and no schedule of theirs), the draft's measured step-aside
    schedule for this device type is returned (default_step_aside_schedule where there is
    none), with K its largest entry (at least 1: vLLM needs one). A K from the user means
    exactly that K at every batch size (schedule None).
    """
    draft_dir = find_draft_for_target(target_model) if model in (None, METHOD) else Path(model)
    config: ChimeraConfig = load_draft(draft_dir, target_hf_config).config
    draft = ResolvedDraft(Path(draft_dir), config,
                          load_measurements(draft_dir).get(device_type, DeviceMeasurements()))
    num_heads = config.num_decoding_heads
    schedule = None
    if num_speculative_tokens is None:
        if schedule_given:
            num_speculative_tokens = num_heads
        else:
            schedule = draft.measured.step_aside_schedule
            if schedule is None:
                schedule = default_step_aside_schedule(num_heads)
                _warn_unmeasured(draft, device_type, f"step-aside schedule {schedule} (batch "
                                 "from, to, K)", "chimera-bench --save-schedule")
            else:
                logger.info("chimera: the draft's step-aside schedule for %s (batch from, to, "
                            "K): %s; give num_speculative_tokens for a fixed K", device_type,
                            schedule)
            num_speculative_tokens = max(1, max(k for _, _, k in schedule))
    if not 1 <= num_speculative_tokens <= num_heads:
        raise ValueError(
            f"num_speculative_tokens={num_speculative_tokens} is out of range for the Chimera "
            f"draft {draft_dir}: it has {num_heads} decoding heads, so K must be in 1..{num_heads}")
    return str(draft_dir), num_speculative_tokens, schedule, draft


def schedule_value(schedule, batch_size: int) -> int:
    """The value of a [[from, to, value]] schedule at a batch size (the last carries on)."""
    for start, end, value in schedule:
        if start <= batch_size <= end:
            return value
    return schedule[-1][2] if batch_size > schedule[-1][1] else 0


def with_tree_steps(step_aside, tree_schedule) -> list[list[int]]:
    """The step-aside K schedule, with K >= 1 wherever the tree schedule drafts a tree
    (the proposer drafts a tree only in steps where vLLM asks for drafts).

    e.g. step-aside [[1, 1, 2], [2, 4, 1], [5, 16, 0]] and trees [[1, 4, 8], [5, 8, 4],
    [9, 16, 0]] -> [[1, 1, 2], [2, 8, 1], [9, 16, 0]]
    """
    starts = sorted({entry[0] for entry in step_aside} | {entry[0] for entry in tree_schedule})
    end = max(step_aside[-1][1], tree_schedule[-1][1])
    merged: list[list[int]] = []
    for start, next_start in zip(starts, starts[1:] + [end + 1]):
        k = schedule_value(step_aside, start)
        if schedule_value(tree_schedule, start) >= 2:
            k = max(k, 1)
        if merged and merged[-1][2] == k:
            merged[-1][1] = next_start - 1
        else:
            merged.append([start, next_start - 1, k])
    return merged


# -- The context lookup (speculative_config["lookup"]) ------------------------------------
MATCHERS = ("ngram", "suffix")
# Each matcher's own settings (a dict naming another matcher's is an error).
MATCHER_KEYS = {"ngram": ("min_match", "max_match", "occurrence"),
                "suffix": ("max_depth", "cache_tokens", "max_spec_factor", "min_token_prob",
                           "choice")}
# num_tokens when unset: the n-gram lookup's 4; the suffix lookup's as vLLM's suffix method
# (its K defaults to its tree depth): the tree's counts shorten each draft.
DEFAULT_NUM_TOKENS = {"ngram": 4, "suffix": 24}
MAX_LOOKUP_TOKENS = 128  # vLLM's rejection sampler handles at most this many drafts per request


@dataclass(frozen=True)
class LookupSettings:
    """Drafting from text instead of the heads, by one of two matchers.

    matcher "suffix" (the default, where arctic-inference is installed; else "ngram", with
    one warning line): see below.

    matcher "ngram": from the request's own text: where the last `min_match`..`max_match`
    tokens occurred before in the request (prompt and output), propose the `num_tokens`
    tokens that followed them instead of the heads' tokens. The longest such suffix
    counts; of its occurrences, `occurrence` "latest" drafts from the last one
    (context_lookup.latest_match, the default: it drafted more tokens per step on held-out
    answers, results/bench/README.md, "The lookup's latest occurrence"), "earliest" from
    the first (vLLM's n-gram matcher, as vLLM's ngram method drafts). Where there is no
    match the heads draft as without the lookup.

    matcher "suffix" (lookup.SuffixLookup, vLLM's suffix decoding as a Chimera lookup):
    suffix trees of depth `max_depth` over the request's context and over earlier
    requests' prompts and outputs (`cache_tokens` tokens at most, the oldest requests
    evicted first; 0: no global cache); up to `num_tokens` tokens (<= max_depth) of the
    most frequent continuation, cut where its estimated probability falls below
    `min_token_prob` or its length passes `max_spec_factor` x the match's (vLLM's
    suffix_decoding_* settings of the same names). `choice` "measured" drafts it where
    its measured acceptance beats the heads' (context_lookup.DraftChoice), "lookup-first"
    wherever there is one.
    """

    matcher: str = "suffix"
    num_tokens: int | None = None  # the most tokens drafted from a match (None: the matcher's default)
    min_match: int = DEFAULT_MIN_MATCH
    max_match: int = 4
    occurrence: str = "latest"
    max_depth: int = 24
    cache_tokens: int = 1 << 18  # the global cache's size cap, in tokens (0: off)
    max_spec_factor: float = 1.0
    min_token_prob: float = 0.1
    choice: str = "measured"

    def __post_init__(self):
        if self.num_tokens is None and self.matcher in DEFAULT_NUM_TOKENS:
            object.__setattr__(self, "num_tokens", DEFAULT_NUM_TOKENS[self.matcher])

    @classmethod
    def parse(cls, value) -> "LookupSettings | None":
        """speculative_config["lookup"]: None or True (defaults), False (off), or a dict of
        the fields above. Raises ValueError naming what is wrong."""
        if value is None or value is True:
            value = {}
        if value is False:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"chimera: 'lookup' must be true, false or a dict with keys "
                             f"{LOOKUP_KEYS}, got {value!r}")
        unknown = sorted(set(value) - set(LOOKUP_KEYS))
        if unknown:
            raise ValueError(f"chimera: unknown 'lookup' settings {unknown}; known: {LOOKUP_KEYS}")
        matcher = value.get("matcher") or _default_matcher(value)
        if matcher not in MATCHERS:
            raise ValueError(f"chimera: lookup matcher must be one of {MATCHERS}, got {matcher!r}")
        for other, keys in MATCHER_KEYS.items():
            foreign = [key for key in keys if key in value and other != matcher]
            if foreign:
                raise ValueError(f"chimera: lookup {foreign} are settings of matcher {other!r}, "
                                 f"not of {matcher!r}")
        for key, setting in value.items():
            _check_lookup_setting(key, setting)
        settings = replace(cls(matcher=matcher), **value)
        if settings.min_match > settings.max_match:
            raise ValueError(f"chimera: lookup min_match={settings.min_match} must be <= "
                             f"max_match={settings.max_match}")
        if matcher == "suffix" and settings.num_tokens > settings.max_depth:
            raise ValueError(f"chimera: lookup num_tokens={settings.num_tokens} must be <= "
                             f"max_depth={settings.max_depth} (a draft continues a match "
                             f"inside the tree's depth)")
        if matcher == "suffix" and importlib.util.find_spec("arctic_inference") is None:
            raise ValueError("chimera: lookup matcher 'suffix' needs arctic-inference 0.3.0 "
                             "(its suffix tree, a source package): `bash scripts/setup.sh` "
                             "builds and installs it; or use matcher 'ngram'")
        return settings

    def to_dict(self) -> dict:
        own = ("matcher", "num_tokens") + MATCHER_KEYS[self.matcher]
        return {key: value for key, value in asdict(self).items() if key in own}


LOOKUP_KEYS = tuple(f.name for f in fields(LookupSettings))


def _default_matcher(value: dict) -> str:
    """The matcher of a lookup dict that names none: the one whose settings it names, else
    "suffix" where arctic-inference is installed, else "ngram" (one warning line)."""
    named = [m for m, keys in MATCHER_KEYS.items() if any(key in value for key in keys)]
    if len(named) == 1:
        return named[0]
    if importlib.util.find_spec("arctic_inference") is not None:
        return "suffix"
    logger.warning_once("chimera: arctic-inference is not installed, so the lookup drafts from "
                        "the request's own text only (matcher 'ngram'); `bash scripts/setup.sh` "
                        "installs it for the default suffix-tree lookup")
    return "ngram"


def _check_lookup_setting(key: str, value) -> None:
    """One speculative_config["lookup"] setting's type and range; ValueError if wrong."""
    choices = {"occurrence": OCCURRENCES, "choice": CHOICES, "matcher": MATCHERS}.get(key)
    if choices is not None:
        ok, rule = value in choices, f"one of {choices}"
    else:
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        integer = number and isinstance(value, int)
        if key == "max_spec_factor":
            ok, rule = number and value > 0, "a number > 0"
        elif key == "min_token_prob":
            ok, rule = number and 0 <= value <= 1, "a number in [0, 1]"
        elif key == "cache_tokens":  # (0 turns the global cache off)
            ok, rule = integer and value >= 0, "an integer >= 0"
        elif key == "num_tokens":
            ok, rule = integer and 1 <= value <= MAX_LOOKUP_TOKENS, f"an integer in 1..{MAX_LOOKUP_TOKENS}"
        else:
            ok, rule = integer and value >= 1, "a positive integer"
    if not ok:
        raise ValueError(f"chimera: lookup {key} must be {rule}, got {value!r}")


# -- Confident chains (speculative_config["min_confidence"]) -------------------------------
def parse_min_confidence(value) -> float | None:
    """speculative_config["min_confidence"]: None (off) or a number in (0, 1).

    With it, a request's chain of head drafts ends before the first head at which the
    product of the heads' top-1 probabilities so far falls below it (the draft's own
    estimate that the whole chain is accepted); head 0 always drafts. A drafted token
    costs verification time even when rejected, so unlikely ones are better not drafted.
    Raises ValueError naming the problem.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"chimera: min_confidence must be a number in (0, 1) (or unset), "
                         f"got {value!r}")
    return float(value)


# -- Skipped draft passes (speculative_config["max_deferred_rows"]) -------------------------
DEFAULT_MAX_DEFERRED_ROWS = 512


def parse_max_deferred_rows(value) -> int:
    """speculative_config["max_deferred_rows"]: None (the default, 512) or an integer >= 0.

    On a step where no request needs the heads (all draft from the lookup, or the batch
    stands aside) the draft's encoder pass is skipped and its rows wait for the next pass
    (vllm/deferred_rows.py); at most this many rows, all requests together, wait at a
    time. 0 runs the pass every step. Raises ValueError naming the problem.
    """
    if value is None:
        return DEFAULT_MAX_DEFERRED_ROWS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"chimera: max_deferred_rows must be an integer >= 0 (0: never skip "
                         f"the draft pass), got {value!r}")
    return value


# -- Token trees (speculative_config["tree"]) ----------------------------------------------
MAX_TREE_TOP_K = 16  # the most candidates per head a tree may ask for (rank < this)
MAX_TREE_DRAFTS = 128  # vLLM's rejection sampler handles at most this many drafts per request


@dataclass(frozen=True)
class TreeSettings:
    """Verifying a token tree of the heads' top-k candidates instead of a chain of top-1s.

    speculative_config["tree"] is a Medusa-style list of paths of top-k ranks
    ([[0], [1], [0, 0], ...]: see vllm_chimera/tree.py) or "auto": the tree that maximises
    expected tokens per second from the draft's measured per-head top-k accuracies and the
    measured step time per verified token count on this device type (its measurements.json,
    written by `chimera-bench --measure-tree --save-schedule`). Where they were not measured,
    "auto" drafts chains (`_auto` says why). `schedule` is the draft's measured tree size
    per batch size ([[from, to, num_nodes]], 0 = no tree: the chain K of the step-aside
    schedule), used with "auto"; a tree given as paths is used at every batch size.
    """

    paths: tuple[tuple[int, ...], ...]
    schedule: tuple[tuple[int, int, int], ...] | None = None

    @property
    def max_num_drafts(self) -> int:
        return len(self.paths)

    @property
    def max_depth_needed(self) -> int:
        return max(len(p) for p in self.paths)

    @classmethod
    def from_dict(cls, value) -> "TreeSettings | None":
        """The normalized form SpeculativeConfigPatch stores (to_dict), or None / False."""
        if not value:
            return None
        schedule = value.get("schedule")
        return cls(tuple(tuple(p) for p in value["paths"]),
                   None if schedule is None else tuple(tuple(e) for e in schedule))

    @classmethod
    def parse(cls, value, draft: ResolvedDraft, device_type: str) -> "TreeSettings | None":
        """None / False (no tree), "auto", or a list of paths; ValueError naming the problem."""
        if value is None or value is False:
            return None
        if isinstance(value, dict):  # already normalized (the config is validated twice)
            return cls._checked(value.get("paths"), draft.config, value.get("schedule"))
        if value == "auto":
            return cls._auto(draft, device_type)
        if isinstance(value, str):
            raise ValueError(f"chimera: tree must be 'auto' or a list of paths of top-k ranks "
                             f"such as [[0], [1], [0, 0]], got {value!r}")
        TokenTree.from_paths(cls._as_paths(value))  # (its own errors: a missing parent, ...)
        return cls._checked(value, draft.config, None)

    @classmethod
    def _auto(cls, draft: ResolvedDraft, device_type: str) -> "TreeSettings | None":
        """tree "auto": the best tree by the draft's measurements on this device type."""
        accuracies = draft.measured.head_top_k_accuracies
        step_seconds = draft.measured.tree_step_seconds
        if not accuracies or not step_seconds:
            # Chains, conservatively: on the one machine measured (SmolLM2, 2-core CPU) no
            # tree beat the best chain at any batch size; at batch 1 the best tree (6
            # verified tokens) ran 26.4 tok/s against the 4-token chain's 29.2, and the
            # 8-node tree 21.7 against the best chain's 31.9 on 80 MT-bench prompts
            # (results/bench/smollm2-tree-measure/tree-measure.md, results/bench/smollm2-tree/).
            # A tree pays only where verifying more tokens is nearly free: a measurement of
            # the machine shows where.
            _warn_unmeasured(draft, device_type, "tree 'auto' drafts chains",
                             "chimera-bench --measure-tree --save-schedule")
            return None
        step_seconds = {int(n): s for n, s in step_seconds.items()}
        schedule = (draft.measured.tree_schedule
                    or [[1, 1 << 30, best_tree(accuracies, step_seconds).num_nodes]])
        max_nodes = max(num_nodes for _, _, num_nodes in schedule)
        if max_nodes < 2:  # no tree paid at any measured batch size
            logger.info("chimera: tree 'auto': the draft's measured tree schedule on %s "
                        "drafts no tree at any batch size (%s); chains only", device_type, schedule)
            return None
        # Best node first, so that the first n paths are the best n-node tree; only as
        # many as the schedule's largest tree (vLLM reserves a slot per draft).
        return cls._checked(best_paths(accuracies, max_nodes), draft.config, schedule)

    @staticmethod
    def _as_paths(value) -> list[tuple[int, ...]]:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(p, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool)
                                                     for r in p) for p in value):
            raise ValueError(f"chimera: tree must be a list of paths, each a list of top-k "
                             f"ranks (ints), got {value!r}")
        return [tuple(p) for p in value]

    @classmethod
    def _checked(cls, value, config: ChimeraConfig, schedule) -> "TreeSettings":
        paths = cls._as_paths(value)
        tree = TokenTree.from_paths(paths)
        if tree.max_depth > config.num_decoding_heads:
            raise ValueError(f"chimera: tree path of depth {tree.max_depth} needs more than the "
                             f"draft's {config.num_decoding_heads} decoding heads")
        if tree.top_k > MAX_TREE_TOP_K:
            raise ValueError(f"chimera: tree rank {tree.top_k - 1} is beyond the heads' top-"
                             f"{MAX_TREE_TOP_K} candidates")
        if len(tree.paths) > MAX_TREE_DRAFTS:
            raise ValueError(f"chimera: a tree of {len(tree.paths)} drafted nodes is more than "
                             f"vLLM verifies per request ({MAX_TREE_DRAFTS})")
        if schedule is not None:
            schedule = tuple(tuple(int(v) for v in entry) for entry in schedule)
            for start, end, num_nodes in schedule:
                TokenTree.from_paths(paths[: max(num_nodes - 1, 1)])  # each size is a tree
        return cls(tuple(paths), schedule)  # (in the given order: see tree_for_batch_size)

    def tree_for_batch_size(self, batch_size: int):
        """The TokenTree to draft at this many running requests, or None (chain).

        A schedule entry's n nodes are the tree of the first n - 1 paths ("auto" lists
        them best first); past the last entry its size carries on."""
        num_nodes = (len(self.paths) + 1 if not self.schedule
                     else schedule_value(self.schedule, batch_size))
        if num_nodes < 2:
            return None
        return TokenTree.from_paths(self.paths[: min(num_nodes, len(self.paths) + 1) - 1])

    def to_dict(self) -> dict:
        return {"paths": [list(p) for p in self.paths],
                "schedule": None if self.schedule is None else [list(e) for e in self.schedule]}
