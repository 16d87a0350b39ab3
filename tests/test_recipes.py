"""Recipes as files (vllm_chimera/training/recipe.py) and chimera-train's subcommands, on
tiny random targets: a recipe is TrainingSettings serialized, a wrong key or value is an
error naming it, each subcommand reaches its function, the shipped recipes name real data."""
from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from test_training import tiny_setup  # noqa: F401 (a fixture)
from vllm_chimera.commands import train as cli
from vllm_chimera.training.recipe import (RecipeError, dumps_table, load_recipe, parse_recipe,
                                          read_answers, settings_from_table, settings_table,
                                          stage_settings)
from vllm_chimera.training.settings import TrainingSettings

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "vllm_chimera" / "drafts" / "smollm2-chimera"


@pytest.fixture(scope="module", autouse=True)
def one_thread_then_restored():
    """One torch thread for this module (tiny matmuls on a shared machine are far slower
    with more), put back afterwards for the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_settings_round_trip_through_a_toml_file(tmp_path):
    settings = TrainingSettings(
        target="t", train_data="a.jsonl,b.jsonl", output_dir="out", val_data="v.jsonl",
        num_heads=3, draft_overrides={"draft_vocab_size": 64, "target_layer_ids": [0, 1],
                                      "sequential_heads": True},
        epochs=2.0, lr=3e-4, head_weights=[1.0, 0.5, 0.25], loss_positions_fraction=0.25,
        skip_lookup_matches=2, kl_weight=3.0, use_trigram_encoder=False, eval_every=400)
    path = tmp_path / "settings.toml"
    path.write_text(dumps_table(settings_table(settings)))
    assert settings_from_table(tomllib.loads(path.read_text())) == settings
    # An int where a float is meant is read as that float (epochs = 2 is 2.0).
    assert settings_from_table({"target": "t", "train_data": "a", "output_dir": "o",
                                "epochs": 2}).epochs == 2.0


RECIPE = """
name = "tiny"
target = "target"
[data]
answers = "answers"
validation = "val"
[settings]
num_heads = 3
max_length = 64
batch_size = 8
micro_batch_size = 4
lr = 3e-3
save_every = 5
progress = false
[[stages]]
name = "first"
train_data = ["train[0:48]"]
epochs = 1
[[stages]]
name = "second"
init = "previous"
train_data = ["train[48:64]", "train[0:16]"]
epochs = 2
lr = 1e-3
"""


@pytest.mark.parametrize("edit, message", [
    (("name = \"tiny\"", "name = \"tiny\"\nowner = \"me\""), "unknown key 'owner'"),
    (("[data]", "[data]\nanswer_dir = \"x\""), "[data]: unknown key 'answer_dir'"),
    (("lr = 3e-3", "lerning_rate = 3e-3"), "[settings]: unknown key 'lerning_rate'"),
    (("epochs = 2", "epochs = 2\nepoch = 2"), "stage 'second': unknown key 'epoch'"),
    (("lr = 3e-3", "lr = \"fast\""), "lr = 'fast' is not float"),
    (("num_heads = 3", "num_heads = true"), "num_heads = True is not int"),
    (("batch_size = 8", "batch_size = 0"), "batch_size must be positive"),
    (("epochs = 1", "epochs = 1\noutput_dir = \"x\""), "'output_dir' (the recipe runner sets it)"),
    (("[\"train[0:48]\"]", "[\"train[48:0]\"]"), "empty slice"),
    (("[\"train[0:48]\"]", "[\"../train\"]"), "not a data slice"),
    (("name = \"first\"", "name = \"first\"\ninit = \"previous\""), "\"previous\" in the first stage"),
    (("name = \"second\"", "name = \"first\""), "unique name"),
    (("precision", "precision"), None),  # (the recipe as written parses)
])
def test_a_wrong_key_or_value_is_an_error_naming_it(tmp_path, edit, message):
    text = RECIPE.replace(*edit, 1)
    path = tmp_path / "r.toml"
    path.write_text(text)
    if message is None:
        assert [s.name for s in load_recipe(path).stages] == ["first", "second"]
        return
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert message in str(error.value)


def _tiny_recipe(setup, folder: Path) -> Path:
    """RECIPE in `folder`, its answers gzipped from tiny_setup's token rows."""
    (folder / "answers").mkdir(parents=True)
    for name, source in (("train", setup["train"]), ("val", setup["val"])):
        with gzip.open(folder / "answers" / f"{name}.jsonl.gz", "wt") as f:
            f.write(Path(source).read_text())
    shutil.copytree(setup["target"], folder / "target")
    (folder / "tiny.toml").write_text(RECIPE)
    return folder / "tiny.toml"


def test_a_recipe_runs_its_stages_in_order_and_resumes(tiny_setup, tmp_path, monkeypatch):
    recipe_file = _tiny_recipe(tiny_setup, tmp_path / "recipe")
    runs = tmp_path / "runs"
    assert cli.train_main(["recipe", str(recipe_file), "--runs-dir", str(runs),
                           "--num-threads", "1"]) == 0
    first, second = runs / "tiny" / "01-first", runs / "tiny" / "02-second"
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["finished"] and metrics["settings"]["init_from"] == str(first / "export")
    assert metrics["settings"]["lr"] == 1e-3 and metrics["settings"]["num_heads"] == 3
    assert metrics["train_sequences"] == 32  # rows 48-63, then 0-15
    with safe_open(first / "export" / "model.safetensors", "pt") as f:  # shipped form: fp16
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} \
            == {torch.float16}
    # Finished stages are skipped when the recipe runs again.
    monkeypatch.setattr("vllm_chimera.training.recipe.train",
                        lambda settings: pytest.fail("a finished stage was trained again"))
    assert cli.train_main(["recipe", str(recipe_file), "--runs-dir", str(runs)]) == 0


def test_a_slice_past_the_end_of_its_answers_is_an_error(tiny_setup, tmp_path):
    recipe_file = _tiny_recipe(tiny_setup, tmp_path / "recipe")
    recipe_file.write_text(RECIPE.replace("train[48:64]", "train[48:65]"))
    recipe = load_recipe(recipe_file)
    with pytest.raises(RecipeError, match=r"has 64 answers, the slice train\[48:65\] needs 65"):
        stage_settings(recipe, recipe.stage("second"), tmp_path / "runs")


def _spy(monkeypatch, name: str) -> list:
    """Record the calls of chimera-train's `name` (still calling it)."""
    calls, real = [], getattr(cli, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, name, spy)
    return calls


def test_each_subcommand_reaches_its_function(tiny_setup, tmp_path, monkeypatch):
    data = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", tiny_setup["val"], "--cache-dir", str(tmp_path / "cache"),
            "--max-length", "64", "--num-heads", "3", "--batch-size", "8",
            "--micro-batch-size", "4", "--epochs", "1", "--no-progress", "--num-threads", "1"]
    calls = {name: _spy(monkeypatch, name) for name in
             ("train", "cache_only", "evaluate_to_file", "average_into",
              "export_draft_keeping_schedules", "run_recipe")}
    assert cli.train_main(["cache", *data, "--output-dir", str(tmp_path / "c")]) == 0
    assert len(calls["cache_only"]) == 1 and not calls["train"]
    assert not (tmp_path / "c" / "checkpoint").exists()
    for seed in ("0", "1"):
        assert cli.train_main(["train", *data, "--seed", seed, "--output-dir", str(tmp_path / seed)]) == 0
    assert len(calls["train"]) == 2 and calls["train"][1][0].seed == 1
    assert cli.train_main(["evaluate", str(tmp_path / "0" / "draft"), *data,
                           "--output-dir", str(tmp_path / "e")]) == 0
    assert calls["evaluate_to_file"][0][1] == str(tmp_path / "0" / "draft")
    assert "head_accuracy" in json.loads((tmp_path / "e" / "evaluation.json").read_text())["validation"]
    assert cli.train_main(["average", str(tmp_path / "0" / "draft"), str(tmp_path / "1" / "draft"),
                           "--target", tiny_setup["target"], "--weights", "1", "3",
                           "--output-dir", str(tmp_path / "soup")]) == 0
    assert calls["average_into"][0][1] == [1.0, 3.0]
    assert (tmp_path / "soup" / "draft" / "config.json").is_file()
    assert cli.train_main(["export", str(tmp_path / "soup" / "draft"), str(tmp_path / "x")]) == 0
    assert calls["export_draft_keeping_schedules"][0][3] == torch.float16
    assert cli.train_main(["recipe", str(REPO / "recipes" / "smollm2-chimera.toml"),
                           "--dry-run"]) == 0
    assert not calls["run_recipe"]  # a dry run runs nothing
    assert len(calls["train"]) == 2 and len(calls["cache_only"]) == 1  # nothing ran twice


def test_subcommand_errors_are_clear(tmp_path, capsys):
    for argv, message in ((["recipe", str(tmp_path / "none.toml")], "no recipe file"),
                          (["recipe", str(REPO / "recipes" / "smollm2-chimera.toml"),
                            "--stage", "nope"], "no stage 'nope'"),
                          (["export", str(tmp_path), str(tmp_path / "x")], "no draft in"),
                          (["train", "--output-dir", "x"], "--target")):
        with pytest.raises(SystemExit) as exit_info:
            cli.train_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["smollm2-chimera", "smollm2-same-budget"])
def test_the_shipped_recipes_parse_and_name_answers_that_exist(name):
    recipe = load_recipe(REPO / "recipes" / f"{name}.toml")
    for data in recipe.slices():  # each file is shipped, and as long as its slice
        assert read_answers(recipe, data), data


def test_the_smollm2_recipe_ends_in_the_run_that_made_the_shipped_draft():
    """The last stage's settings are those recorded by the run of the shipped draft (paths,
    threads and the machine's precision aside), and they build the shipped draft's design."""
    recipe = load_recipe(REPO / "recipes" / "smollm2-chimera.toml")
    assert recipe.ship == SHIPPED
    run = next((REPO / "results" / "training").glob("chimera-k4-seq-*-new6261-*"))
    recorded = json.loads((run / "metrics.json").read_text())["settings"]
    last = {**recipe.settings, **recipe.stages[-1].settings}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingSettings)
                if f.default is not dataclasses.MISSING}
    machine = {"target", "train_data", "val_data", "output_dir", "init_from", "num_threads",
               "cache_precision", "autocast"}
    for key, value in recorded.items():
        if key not in machine:
            assert last.get(key, defaults.get(key)) == value, key
    config = json.loads((SHIPPED / "config.json").read_text())
    assert last["num_heads"] == config["num_decoding_heads"]
    for key, value in last["draft_overrides"].items():
        assert config[key] == value, key
    assert [str(d) for d in recipe.stages[-1].train_data] == [
        "train.smollm2-self-prompts[6261:8969]", "train.smollm2-self-extra[768:3840]"]
    assert recorded["train_data"].endswith("train.smollm2-self-extra-from768.jsonl")


def test_parse_recipe_checks_each_stage_with_training_settings(tmp_path):
    table = tomllib.loads(RECIPE)
    table["stages"][1]["draft_kind"] = "eagle"
    table["stages"][1]["loss_positions_fraction"] = 0.25
    with pytest.raises(RecipeError, match="stage 'second'.*loss_positions_fraction is for parallel"):
        parse_recipe(table, tmp_path / "r.toml")
