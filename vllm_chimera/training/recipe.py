"""Recipes as files: a draft's whole training (data slices, settings, init, stages) in TOML.

A recipe is a serialization of TrainingSettings plus the list of runs ("stages") that make
a draft, each continuing the one before where it says `init = "previous"`:

    name = "smollm2-chimera"
    target = "smollm2"                     # a prepared target's name, or a folder
    precision = "bf16-where-native"        # or "fp32" / "bf16" (cache_precision + autocast)
    ship = "../vllm_chimera/drafts/smollm2-chimera"   # where --ship writes the last draft

    [data]
    answers = "../results/training/data"   # NAME.jsonl.gz answer files, beside the recipe
    validation = "validation.smollm2-self"

    [settings]                             # TrainingSettings fields shared by every stage
    num_heads = 4
    draft_overrides = { draft_vocab_size = 8192 }

    [[stages]]
    name = "v2-e3-more"
    train_data = ["train.smollm2-self", "train.smollm2-self-more[0:2048]"]
    epochs = 3                             # any TrainingSettings field, over [settings]

A data slice is an answer file's name with an optional [start:stop] of its lines (stop
explicit, so a file that grows later does not change the recipe). Relative paths are read
from the recipe file's folder. Unknown keys and values of the wrong type are errors that
name the key (RecipeError). run_recipe() runs every stage, resumably: a finished stage is
skipped, an interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_chimera.prepare.cache import cache_dir, target_dir
from vllm_chimera.training.checkpointing import export_draft_keeping_schedules
from vllm_chimera.training.settings import TrainingSettings
from vllm_chimera.training.trainer import native_bf16, train

# TrainingSettings fields a recipe never sets: the runner derives them from the recipe.
RUNNER_FIELDS = ("target", "train_data", "val_data", "output_dir", "cache_dir", "init_from")
RECIPE_KEYS = ("name", "target", "precision", "ship", "data", "settings", "stages")
DATA_KEYS = ("answers", "validation")
STAGE_KEYS = ("name", "init", "train_data")
PRECISIONS = ("bf16-where-native", "bf16", "fp32")
_SLICE = re.compile(r"^(?P<name>[\w.+-]+)(\[(?P<start>\d*):(?P<stop>\d*)\])?$")


class RecipeError(ValueError):
    """A recipe that cannot be run as written (the message names the key or file)."""


# -- settings <-> TOML tables ---------------------------------------------------------------
def _matches(value, hint) -> bool:
    """Whether a TOML value fits a TrainingSettings annotation (bools are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_settings_table(table: dict, where: str, allowed=None) -> dict:
    """`table` checked against TrainingSettings' fields and types (RecipeError naming the
    key otherwise); ints given for float fields become floats."""
    hints = typing.get_type_hints(TrainingSettings)
    allowed = set(hints) if allowed is None else set(allowed)
    checked = {}
    for key, value in table.items():
        if key not in allowed:
            hint = (" (the recipe runner sets it)" if key in RUNNER_FIELDS else
                    f"; known: {', '.join(sorted(allowed))}")
            raise RecipeError(f"{where}: unknown key {key!r}{hint}")
        if not _matches(value, hints[key]):
            raise RecipeError(f"{where}: {key} = {value!r} is not {_type_name(hints[key])}")
        is_float = hints[key] is float or float in typing.get_args(hints[key])
        checked[key] = float(value) if is_float and isinstance(value, int) else value
    return checked


def settings_from_table(table: dict, where: str = "settings") -> TrainingSettings:
    """TrainingSettings from a TOML table of its fields (RecipeError on an unknown key, a
    value of the wrong type, or a value TrainingSettings refuses)."""
    checked = check_settings_table(table, where)
    try:
        return TrainingSettings(**checked)
    except TypeError as e:  # a required field missing
        raise RecipeError(f"{where}: {e}") from e
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e


def settings_table(settings: TrainingSettings) -> dict:
    """The TOML table of `settings` (None fields left out: TOML has no null)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if v is not None}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON's escaping
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise RecipeError(f"cannot write {value!r} as TOML")


def dumps_table(table: dict, header: str | None = None) -> str:
    """One TOML table (scalars, lists, inline tables), e.g. a stage's settings."""
    lines = [f"[{header}]"] if header else []
    lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


# -- the recipe file ------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSlice:
    """Lines [start, stop) of the answer file NAME.jsonl.gz (stop None: to its end)."""
    name: str
    start: int = 0
    stop: int | None = None

    @classmethod
    def parse(cls, text: str, where: str) -> "DataSlice":
        """ "NAME" or "NAME[start:stop]" (either bound may be left out)."""
        match = _SLICE.match(text) if isinstance(text, str) else None
        if match is None:
            raise RecipeError(f"{where}: {text!r} is not a data slice (NAME or NAME[start:stop])")
        start = int(match["start"]) if match["start"] else 0
        stop = int(match["stop"]) if match["stop"] else None
        if stop is not None and stop <= start:
            raise RecipeError(f"{where}: {text!r} is an empty slice")
        return cls(match["name"], start, stop)

    def __str__(self) -> str:
        if self.start == 0 and self.stop is None:
            return self.name
        return f"{self.name}[{self.start}:{'' if self.stop is None else self.stop}]"

    def file_name(self) -> str:
        """The materialized file's name: NAME.jsonl, or NAME.START-STOP.jsonl for a part."""
        if self.start == 0 and self.stop is None:
            return f"{self.name}.jsonl"
        return f"{self.name}.{self.start}-{'end' if self.stop is None else self.stop}.jsonl"


@dataclass
class Stage:
    """One training run of a recipe: its data, where it starts from, its settings."""
    name: str
    train_data: list[DataSlice]
    init: str | None = None  # None: from scratch; "previous": the stage before's draft; a folder
    settings: dict = field(default_factory=dict)  # TrainingSettings fields over the recipe's


@dataclass
class Recipe:
    path: Path
    name: str
    target: str
    answers: Path  # the folder of NAME.jsonl.gz answer files
    validation: DataSlice | None
    stages: list[Stage]
    settings: dict = field(default_factory=dict)  # TrainingSettings fields for every stage
    precision: str = "fp32"
    ship: Path | None = None

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise RecipeError(f"{self.path}: no stage {name!r} (stages: "
                          f"{', '.join(s.name for s in self.stages)})")

    def slices(self) -> list[DataSlice]:
        """Every data slice the recipe names, validation first."""
        found = [self.validation] if self.validation else []
        return found + [s for stage in self.stages for s in stage.train_data]


def _unknown(table: dict, known, where: str) -> None:
    for key in table:
        if key not in known:
            raise RecipeError(f"{where}: unknown key {key!r}; known: {', '.join(known)}")


def _stage(table: dict, index: int, path: Path, names: set) -> Stage:
    where = f"{path}: stages[{index}]"
    name = table.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name in names:
        raise RecipeError(f"{where}: needs a unique name of letters, digits, '.', '-' or '_', "
                          f"got {name!r}")
    where = f"{path}: stage {name!r}"
    data = table.get("train_data")
    if not isinstance(data, list) or not data:
        raise RecipeError(f"{where}: train_data must be a non-empty list of data slices")
    init = table.get("init")
    if init is not None and not isinstance(init, str):
        raise RecipeError(f"{where}: init must be \"previous\" or a draft folder, got {init!r}")
    if init == "previous" and index == 0:
        raise RecipeError(f"{where}: init = \"previous\" in the first stage")
    if init not in (None, "previous"):
        init = str((path.parent / init).resolve())
    settings = {k: v for k, v in table.items() if k not in STAGE_KEYS}
    allowed = set(typing.get_type_hints(TrainingSettings)) - set(RUNNER_FIELDS)
    return Stage(name, [DataSlice.parse(d, f"{where}: train_data") for d in data], init,
                 check_settings_table(settings, where, allowed))


def parse_recipe(table: dict, path: Path) -> Recipe:
    """A Recipe from a parsed TOML document (RecipeError naming what is wrong)."""
    _unknown(table, RECIPE_KEYS, str(path))
    for key in ("name", "target"):
        if not isinstance(table.get(key), str):
            raise RecipeError(f"{path}: {key} must be a string, got {table.get(key)!r}")
    data = table.get("data", {})
    _unknown(data, DATA_KEYS, f"{path}: [data]")
    precision = table.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise RecipeError(f"{path}: precision must be one of {PRECISIONS}, got {precision!r}")
    allowed = set(typing.get_type_hints(TrainingSettings)) - set(RUNNER_FIELDS)
    settings = check_settings_table(table.get("settings", {}), f"{path}: [settings]", allowed)
    stages, names = [], set()
    for i, stage in enumerate(table.get("stages", [])):
        stages.append(_stage(stage, i, path, names))
        names.add(stages[-1].name)
    if not stages:
        raise RecipeError(f"{path}: no [[stages]]")
    for stage in stages:  # TrainingSettings' own checks, before any run starts
        settings_from_table({**settings, **stage.settings, "target": table["target"],
                             "train_data": "-", "output_dir": "-"},
                            f"{path}: stage {stage.name!r}")
    validation = data.get("validation")
    return Recipe(path=path, name=table["name"], target=table["target"],
                  answers=(path.parent / data.get("answers", ".")).resolve(),
                  validation=DataSlice.parse(validation, f"{path}: [data] validation")
                  if validation is not None else None,
                  stages=stages, settings=settings, precision=precision,
                  ship=(path.parent / table["ship"]).resolve() if "ship" in table else None)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file (RecipeError on anything a run would trip over later)."""
    path = Path(path).resolve()
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise RecipeError(f"no recipe file {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not TOML: {e}") from e
    return parse_recipe(table, path)


# -- running it -----------------------------------------------------------------------------
def read_answers(recipe: Recipe, data: DataSlice) -> list[str]:
    """The lines of `data` from its answer file in recipe.answers (RecipeError where the
    file is missing or shorter than the slice)."""
    source = recipe.answers / f"{data.name}.jsonl.gz"
    if not source.is_file():
        raise RecipeError(f"{recipe.path}: no answer file {source} for data slice {data.name!r}")
    with gzip.open(source, "rt") as f:
        lines = [line for line in f if line.strip()]
    if data.stop is not None and data.stop > len(lines):
        raise RecipeError(f"{recipe.path}: {source} has {len(lines)} answers, the slice "
                          f"{data.name}[{data.start}:{data.stop}] needs {data.stop}")
    return lines[data.start:data.stop]


def materialize(recipe: Recipe, data: DataSlice, folder: Path) -> Path:
    """`data` as a JSONL file in `folder`, rewritten only when its lines changed (the
    hidden-state cache is keyed by the file's size and time, so it stays valid)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / data.file_name()
    text = "".join(read_answers(recipe, data))
    if not out.is_file() or out.read_text() != text:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return out


def resolve_target(recipe: Recipe, cache: str | None) -> str:
    """recipe.target as a folder: a prepared target's, or a folder (beside the recipe)."""
    prepared = target_dir(recipe.target, cache)
    if Path(recipe.target).name == recipe.target and (prepared / "config.json").is_file():
        return str(prepared)
    folder = (recipe.path.parent / recipe.target).resolve()
    if (folder / "config.json").is_file():
        return str(folder)
    raise RecipeError(f"{recipe.path}: target {recipe.target!r} is not prepared (no "
                      f"{prepared}): run `chimera-prepare target {recipe.target}`")


def precision_settings(precision: str) -> dict:
    """recipe.precision as TrainingSettings fields: bf16 caching and autocast, or fp32."""
    bf16 = precision == "bf16" or (precision == "bf16-where-native" and native_bf16(
        torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    return {"cache_precision": "bf16", "autocast": "bf16"} if bf16 else {"cache_precision": "fp32"}


def stage_dir(recipe: Recipe, stage: Stage, runs: Path) -> Path:
    return runs / recipe.name / f"{recipe.stages.index(stage) + 1:02d}-{stage.name}"


def stage_init(recipe: Recipe, stage: Stage, runs: Path) -> str | None:
    """The draft folder a stage starts from: the stage before's shipped form (fp16, as each
    shipped draft was continued), a folder, or None (from scratch)."""
    if stage.init != "previous":
        return stage.init
    before = recipe.stages[recipe.stages.index(stage) - 1]
    return str(stage_dir(recipe, before, runs) / "export")


def stage_settings(recipe: Recipe, stage: Stage, runs: Path, cache: str | None = None,
                   num_threads: int | None = None) -> TrainingSettings:
    """The TrainingSettings of one stage: the recipe's, the stage's over them, its data
    materialized under the cache, its output under `runs`."""
    data_dir = cache_dir(cache) / "data" / "recipes"
    train_data = ",".join(str(materialize(recipe, d, data_dir)) for d in stage.train_data)
    val_data = str(materialize(recipe, recipe.validation, data_dir)) if recipe.validation else None
    table = {**recipe.settings, **precision_settings(recipe.precision), **stage.settings,
             "target": resolve_target(recipe, cache), "train_data": train_data,
             "val_data": val_data, "output_dir": str(stage_dir(recipe, stage, runs)),
             "cache_dir": cache, "init_from": stage_init(recipe, stage, runs),
             "num_threads": num_threads}
    return settings_from_table({k: v for k, v in table.items() if v is not None},
                               f"{recipe.path}: stage {stage.name!r}")


def stage_finished(folder: Path) -> bool:
    metrics = folder / "metrics.json"
    return metrics.is_file() and json.loads(metrics.read_text()).get("finished", False)


def run_stage(recipe: Recipe, stage: Stage, runs: Path, cache: str | None = None,
              num_threads: int | None = None) -> bool:
    """Train one stage (resumably) and export a Chimera draft in its shipped form (fp16)
    to STAGE_DIR/export; True once finished, False if stopped early (run again)."""
    folder = stage_dir(recipe, stage, runs)
    if not stage_finished(folder):
        settings = stage_settings(recipe, stage, runs, cache, num_threads)
        if settings.init_from and not Path(settings.init_from, "config.json").is_file():
            raise RecipeError(f"stage {stage.name!r} starts from {settings.init_from}, "
                              "which holds no draft (run the stage before it first)")
        print(f"== {recipe.name}: stage {stage.name} -> {folder}", flush=True)
        if not (train(settings) or {}).get("finished"):
            return False
    draft_kind = {**recipe.settings, **stage.settings}.get("draft_kind", "chimera")
    if draft_kind == "chimera" and not (folder / "export" / "config.json").is_file():
        export_draft_keeping_schedules(folder / "draft", folder / "export")
    return True


def run_recipe(recipe: Recipe, runs: str | os.PathLike, cache: str | None = None,
               stages: list[str] | None = None, num_threads: int | None = None,
               ship: bool = False) -> Path | None:
    """Run the recipe's stages in order (or only those named), each resumable; a finished
    stage is skipped. With `ship`, the last stage's draft goes to recipe.ship (fp16, keeping
    the measured step-aside schedules there). Returns the last stage's folder, or None if a
    stage stopped early."""
    runs = Path(runs)
    chosen = [recipe.stage(name) for name in stages] if stages else recipe.stages
    for stage in chosen:
        if not run_stage(recipe, stage, runs, cache, num_threads):
            print(f"stage {stage.name} stopped before its end: run the recipe again to resume",
                  flush=True)
            return None
    last = stage_dir(recipe, chosen[-1], runs)
    if ship:
        if recipe.ship is None:
            raise RecipeError(f"{recipe.path}: no `ship` folder to ship the draft to")
        export_draft_keeping_schedules(last / "draft", recipe.ship, schedules_from=recipe.ship)
    print(f"{recipe.name}: done; the last stage's draft is in {last / 'draft'}"
          + (f", shipped to {recipe.ship}" if ship else ""), flush=True)
    return last
