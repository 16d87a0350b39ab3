"""chimera-bench in quick mode on toy models: every figure present, greedy equality checked."""
import json

import pytest
import torch

import vllm_utils  # noqa: F401  (environment for vLLM)
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.toy import build_permutation_pair

pytest.importorskip("vllm")
from vllm_chimera.vllm.bench import BenchSettings, run_benchmark  # noqa: E402


def test_quick_benchmark_writes_json_table_and_plot(tmp_path):
    _, draft, pi = build_permutation_pair(tmp_path, num_heads=4, num_wrong=32)
    save_draft(draft, tmp_path / "draft")
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 128, (5 + i,), generator=g).tolist()}
               for i in range(8)]
    settings = BenchSettings(target=str(tmp_path / "target"), draft=str(tmp_path / "draft"),
                             batch_sizes=(1, 4), max_tokens=24, sampled_temperature=0.7,
                             engine_kwargs=dict(kv_cache_memory_bytes=64 << 20, max_model_len=512))
    report = run_benchmark(settings, prompts, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["environment"]["vllm"] == "0.32.0" and set(saved["results"]) == {"plain", "ngram", "chimera"}
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
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| chimera | 4 |" in table and "NO" not in table
    assert (tmp_path / "out" / "bench.png").stat().st_size > 10_000


def test_bench_cli_rejects_bad_batch_sizes(capsys):
    from vllm_chimera.cli import bench_main

    with pytest.raises(SystemExit):
        bench_main(["--target", "x", "--batch-sizes", "1,a"])
    assert "comma-separated integers" in capsys.readouterr().err
