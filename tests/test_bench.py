"""chimera-bench in quick mode on toy models: every figure present, greedy equality checked."""
import dataclasses
import json

import pytest
import torch

import vllm_utils  # noqa: F401  (environment for vLLM)
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.toy import build_permutation_pair

pytest.importorskip("vllm")
from vllm_chimera.harness.bench import BenchSettings, run_benchmark  # noqa: E402


def test_quick_benchmark_writes_json_table_and_plot(tmp_path):
    _, draft, pi = build_permutation_pair(tmp_path, num_heads=4, num_wrong=32)
    save_draft(draft, tmp_path / "draft")
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 128, (5 + i,), generator=g).tolist()}
               for i in range(8)]
    settings = BenchSettings(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"),
                             methods=("plain", "ngram", "chimera", "chimera:2"),
                             batch_sizes=(1, 4), max_tokens=24, sampled_temperature=0.7,
                             lookup={"matcher": "ngram"},  # (its 4-token drafts: vLLM's K below)
                             engine_kwargs=dict(kv_cache_memory_bytes=64 << 20, max_model_len=512))
    report = run_benchmark(settings, prompts, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["environment"]["vllm"] == "0.32.0" and set(saved["results"]) == {"plain", "ngram", "chimera", "chimera:2"}
    chimera = report["results"]["chimera"]
    assert [row["batch_size"] for row in chimera["greedy"]] == [1, 4]
    for run in report["results"].values():
        for row in run["greedy"]:
            assert row["greedy_equals_plain"], (run["method"], row["mismatched_requests"])
            assert row["tokens_per_second"] > 0 and row["mean_latency_s"] > 0
    # The toy draft is mostly right: more than 2 tokens per target step, every position used.
    assert chimera["greedy"][0]["mean_acceptance_length"] > 2.0
    assert len(chimera["greedy"][0]["acceptance_rate_per_position"]) == 4
    assert "sampled" in chimera and chimera["sampled"]["output_tokens"] > 0
    assert chimera["sampled"]["batch_size"] == 4  # the largest, by default
    # "chimera:2"'s heads draft exactly 2 tokens, its lookup 4 (vLLM's K); "chimera" all 4
    # heads alone (nothing measured of this draft: spec_config.default_step_aside_schedule).
    assert chimera["num_speculative_tokens"] == 4
    assert chimera["schedule"] == [[1, 1, 4], [2, 3, 1], [4, 4, 0]]
    assert report["results"]["chimera:2"]["num_head_tokens"] == 2
    assert report["results"]["chimera:2"]["num_speculative_tokens"] == 4
    # Where the step's time goes: every part measured, drafting only where there is a draft.
    for method in ("plain", "chimera"):
        times = report["results"][method]["greedy"][0]["step_times"]
        assert times["num_steps"] > 0 and times["forward_ms"] > 0 and times["other_ms"] > 0
    assert report["results"]["chimera"]["greedy"][0]["step_times"]["draft_ms"] > 0
    assert report["results"]["plain"]["greedy"][0]["step_times"]["draft_ms"] == 0
    # A K per measured batch size, from the chimera:2 rows (0 where it is not faster).
    schedule = saved["step_aside_schedule"]
    assert [entry[:2] for entry in schedule] == [[1, 1], [2, 4]] and {e[2] for e in schedule} <= {0, 2}
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| chimera | 4 |" in table and "NO" not in table
    assert (tmp_path / "out" / "bench.png").stat().st_size > 10_000

    # Finished methods are saved as they finish; the same benchmark again reuses them all.
    saved_runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert saved_runs == ["chimera-k2.json", "chimera.json", "ngram.json", "plain.json"]
    again = run_benchmark(settings, prompts, tmp_path / "out")
    assert again["results"]["chimera"]["startup_seconds"] == chimera["startup_seconds"]
    # ... but not with another draft at the same path (here: a step-aside schedule saved into it,
    # which "chimera" then runs with); plain's run does not depend on the draft.
    from vllm_chimera.harness.bench import save_schedule

    save_schedule([[1, 1, 3], [2, 64, 0]], tmp_path / "draft", device_type="cpu")
    redrafted = run_benchmark(dataclasses.replace(settings, methods=("plain", "chimera")), prompts,
                          tmp_path / "out")
    assert redrafted["results"]["plain"]["startup_seconds"] == report["results"]["plain"]["startup_seconds"]
    assert redrafted["results"]["chimera"]["schedule"] == [[1, 1, 3], [2, 64, 0]]
    assert redrafted["results"]["chimera"]["num_head_tokens"] == 3
    assert redrafted["results"]["chimera"]["num_speculative_tokens"] == 4  # (the lookup's)
    # ... and not when asked to run it again (after a code change: the code is not in the key).
    forced = run_benchmark(settings, prompts, tmp_path / "out", rerun=("ngram",))
    assert forced["results"]["ngram"]["startup_seconds"] != report["results"]["ngram"]["startup_seconds"]
    assert forced["results"]["plain"]["startup_seconds"] == report["results"]["plain"]["startup_seconds"]
    # Two rounds: the first round's runs are reused, the second runs each method again in a
    # fresh process (runs/*-r2.json); rows carry both rounds, greedy outputs checked in both.
    two = run_benchmark(dataclasses.replace(settings, methods=("plain", "chimera:2"), rounds=2),
                        prompts, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "runs").glob("*-r2.json")) == [
        "chimera-k2-r2.json", "plain-r2.json"]
    row = two["results"]["chimera:2"]["greedy"][0]
    assert len(row["speedup_by_round"]) == 2 and row["greedy_equals_plain"]
    assert row["speedup"] == min(row["speedup_by_round"])  # (the lower middle of two)
    assert "2 rounds" in (tmp_path / "out" / "bench.md").read_text()
    # ... nor with other settings.
    changed = dataclasses.replace(settings, methods=("plain",), max_tokens=20)
    rerun = run_benchmark(changed, prompts, tmp_path / "out")
    assert rerun["results"]["plain"]["startup_seconds"] != report["results"]["plain"]["startup_seconds"]


def test_bench_cli_rejects_bad_arguments(capsys):
    from vllm_chimera.commands.bench import bench_main

    cases = [  # (arguments after --target x, what the error says)
        (["--batch-sizes", "1,a"], "comma-separated integers"),
        (["--draft", "d", "--methods", "plain,chimera", "--save-schedule"],  # nothing to derive from
         "needs chimera:K methods"),
        (["--methods", "plain,chimera", "--rerun", "eagle"], "--rerun eagle: not among --methods"),
        (["--methods", "plain,chimera:0"], "K must be a positive integer"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--lookup-occurrence", "first"], "invalid choice: 'first'"),
        (["--lookup-tokens", "0"], "--lookup-tokens must be at least 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            bench_main(["--target", "x", *argv])
        assert message in capsys.readouterr().err, argv


def test_method_specs():
    from vllm_chimera.harness.bench import method_config, parse_method

    assert parse_method("chimera:3") == ("chimera", 3) and parse_method("plain") == ("plain", None)
    for bad in ("chimera:0", "chimera:x", "plain:2"):
        with pytest.raises(ValueError, match="K must be a positive integer"):
            parse_method(bad)
    settings = BenchSettings(target="t", draft="d")
    assert method_config("chimera:2", settings) == {"method": "chimera", "model": "d",
                                                    "lookup": True, "num_speculative_tokens": 2}
    assert method_config("chimera", settings) == {"method": "chimera", "model": "d", "lookup": True}
    assert method_config("ngram:3", settings)["num_speculative_tokens"] == 3
    assert method_config("suffix", settings) == {"method": "suffix"}


def test_chimera_methods_with_and_without_the_lookup():
    from vllm_chimera.harness.bench import method_config

    settings = BenchSettings(target="t", draft="d")
    assert method_config("chimera:1", settings) == {
        "method": "chimera", "model": "d", "lookup": True, "num_speculative_tokens": 1}
    assert method_config("chimera-nolookup", settings)["lookup"] is False
    settings = dataclasses.replace(settings, lookup={"num_tokens": 8})
    assert method_config("chimera", settings)["lookup"] == {"num_tokens": 8}


def test_the_lookup_flags_reach_chimeras_config():
    """--lookup-tokens and --lookup-occurrence become chimera's lookup settings (unset: the
    plugin's defaults, `True`); bad values: test_bench_cli_rejects_bad_arguments."""
    import argparse

    from vllm_chimera.commands.bench import lookup_settings
    from vllm_chimera.harness.bench import method_config

    def lookup(**flags):
        args = argparse.Namespace(**{"lookup_tokens": None, "lookup_occurrence": None, **flags})
        settings = BenchSettings(target="t", draft="d", lookup=lookup_settings(args))
        return method_config("chimera:4", settings)["lookup"]

    assert lookup() is True
    assert lookup(lookup_occurrence="earliest") == {"occurrence": "earliest"}
    assert lookup(lookup_tokens=6, lookup_occurrence="latest") == {"num_tokens": 6,
                                                                   "occurrence": "latest"}


def test_tree_methods_and_options(capsys):
    from vllm_chimera.commands.bench import bench_main
    from vllm_chimera.harness.bench import method_config

    settings = BenchSettings(target="t", draft="d")
    assert method_config("chimera-tree", settings) == {"method": "chimera", "model": "d",
                                                       "lookup": True, "tree": "auto"}
    settings = dataclasses.replace(settings, tree=[[0], [1]])
    assert method_config("chimera-tree-nolookup:2", settings) == {
        "method": "chimera", "model": "d", "lookup": False, "tree": [[0], [1]], "num_speculative_tokens": 2}
    for argv, message in [(["--tree", "[[0], [1]"], "--tree must be 'auto' or a JSON list"),
                          (["--measure-tree"], "--measure-tree needs --draft"),
                          (["--draft", "d", "--measure-tree", "--tree-sizes", "1,4"], "--tree-sizes must be in 2..129"),
                          (["--draft", "d", "--measure-tree", "--tree-top-k", "17"], "--tree-top-k must be in 1..16")]:
        with pytest.raises(SystemExit):
            bench_main(["--target", "x", *argv])
        assert message in capsys.readouterr().err, argv


def _fake_run(tokens_per_second: list[float], token_ids: list[list[int]], sampled: float | None = None) -> dict:
    run = {"method": "m", "greedy": [
        {"batch_size": b, "tokens_per_second": tps, "time_per_output_token_ms": 1.0,
         "mean_latency_s": 1.0, "mean_acceptance_length": 1.5, "acceptance_rate_per_position": [],
         "output_tokens": 10, "token_ids": [list(ids) for ids in token_ids]}
        for b, tps in zip((1, 4), tokens_per_second)]}
    if sampled is not None:
        run["sampled"] = {"batch_size": 4, "tokens_per_second": sampled, "mean_acceptance_length": 1.2}
    return run


def test_rounds_take_each_rounds_own_plain_and_the_median_round():
    from vllm_chimera.harness.bench import combine_rounds, markdown_table

    ids = [[1, 2, 3], [4, 5]]
    wrong = [[1, 2, 3], [4, 6]]
    # Plain moves 20 -> 22 -> 18 tok/s between processes; chimera's ratios stay near 1.3.
    rounds = [{"plain": _fake_run([20.0, 40.0], ids, 30.0), "chimera:1": _fake_run([26.0, 44.0], ids, 33.0)},
              {"plain": _fake_run([22.0, 40.0], ids, 30.0), "chimera:1": _fake_run([27.5, 36.0], wrong, 36.0)},
              {"plain": _fake_run([18.0, 40.0], ids, 30.0), "chimera:1": _fake_run([25.2, 48.0], ids, 30.0)}]
    runs = combine_rounds(rounds)
    row = runs["chimera:1"]["greedy"][0]
    assert row["speedup_by_round"] == pytest.approx([1.3, 1.25, 1.4])
    assert row["speedup"] == pytest.approx(1.3) and row["tokens_per_second"] == 26.0  # round 1's row
    assert row["tokens_per_second_by_round"] == [26.0, 27.5, 25.2]
    # Batch 4: speedups 1.1, 0.9, 1.2 -> round 1 again; round 2's second request differs from plain.
    row4 = runs["chimera:1"]["greedy"][1]
    assert row4["speedup"] == pytest.approx(1.1)
    assert row4["mismatched_requests"] == [1] and not row4["greedy_equals_plain"]
    plain = runs["plain"]["greedy"][0]
    assert plain["tokens_per_second"] == 20.0 and plain["speedup"] == 1.0  # the median plain round
    assert plain["greedy_equals_plain"] and "token_ids" not in plain
    assert runs["chimera:1"]["sampled"]["speedup"] == pytest.approx(1.1)  # of 1.1, 1.2, 1.0
    table = markdown_table({"settings": {"rounds": 3, "sampled_temperature": 0.7},
                            "results": runs})
    assert "| chimera:1 | 1 | 26.0 (25.2-27.5) | 1.30x (1.25-1.40) |" in table
    assert "| plain | 1 | 20.0 (18.0-22.0) | 1.00x (1.00-1.00) |" in table
    assert "3 rounds" in table
    # One round: the plain ratio, no spread.
    one = combine_rounds(rounds[:1])
    assert one["chimera:1"]["greedy"][0]["speedup"] == pytest.approx(1.3)
    assert "(" not in markdown_table({"settings": {"rounds": 1, "sampled_temperature": 0.7}, "results": one}).split("\n")[2]
