"""Kernel parity (compiled Triton) and timings against the PyTorch references, on one device.

Needs only torch, Triton and this repository's kernels/ (importable as chimera_kernels):
no vLLM, no network. scripts/gpu_check.sh runs it on a CUDA machine and writes its
report under results/gpu/. Every kernel is checked against its reference over shapes
from the draft's real use (SmolLM2-135M: d = 576, 8,192- and 49,152-token embeddings;
trees of 2..64 nodes after 0..2,000 cached tokens) and then timed (CUDA events, median
of repeats, after warm-up).

    python scripts/gpu_check.py --output results/gpu/2026-12-02
    TRITON_INTERPRET=1 python scripts/gpu_check.py --device cpu --quick   # the script's own smoke test
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from chimera_kernels import (tree_attention_mask_reference, tree_attention_mask_triton,
                             trigram_encoder_reference, trigram_encoder_triton)

TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
              torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def trigram_cases(quick: bool):
    # (sequence lengths, d, d_out, vocab, dtype, with prefix ids)
    cases = [([1], 576, 576, 8192, torch.float32, True),  # one decoding request
             ([5] * 16, 576, 576, 8192, torch.bfloat16, True),  # batch 16, 5 rows each
             ([512] * 4, 576, 576, 49152, torch.bfloat16, False),  # training-sized
             ([2048], 576, 576, 49152, torch.float32, False),  # a long prefill
             ([3, 1, 7], 64, 96, 100, torch.float16, True)]
    return cases[:2] + cases[-1:] if quick else cases


def check_trigram(device: torch.device, repeats: int, quick: bool) -> list[dict]:
    rows = []
    for seqlens, d, d_out, vocab, dtype, with_prefix in trigram_cases(quick):
        gen = torch.Generator().manual_seed(0)
        num_tokens = sum(seqlens)
        token_ids = torch.randint(0, vocab, (num_tokens,), generator=gen).to(device)
        cu_seqlens = torch.tensor([0] + seqlens).cumsum(0).to(torch.int32).to(device)
        embed = torch.randn(vocab, d, generator=gen).to(dtype).to(device)
        w1 = (torch.randn(d_out, 3 * d, generator=gen) / (3 * d) ** 0.5).to(dtype).to(device)
        bias = (0.1 * torch.randn(d_out, generator=gen)).to(dtype).to(device)
        prefix = (torch.randint(-1, vocab, (len(seqlens), 2), generator=gen).to(device)
                  if with_prefix else None)
        args = (token_ids, cu_seqlens, embed, w1, bias, "silu", prefix)
        expected, actual = trigram_encoder_reference(*args), trigram_encoder_triton(*args)
        error = (actual.float() - expected.float()).abs().max().item()
        ok = torch.allclose(actual.float(), expected.float(), **TOLERANCES[dtype])
        rows.append({"kernel": "trigram_encoder", "shape": f"seqs {seqlens[:3]}{'...' if len(seqlens) > 3 else ''} "
                     f"({num_tokens} tokens), d {d} -> {d_out}, vocab {vocab}, prefix {with_prefix}",
                     "dtype": str(dtype).removeprefix("torch."), "max_abs_error": error, "parity": ok,
                     "reference_ms": _timed(lambda: trigram_encoder_reference(*args), device, repeats),
                     "triton_ms": _timed(lambda: trigram_encoder_triton(*args), device, repeats)})
    return rows


def tree_cases(quick: bool):
    # (parents, prefix lengths): chains, wide and deep trees, batch 1 and 16
    def medusa_like(num_nodes: int) -> list[int]:  # each node's parent: a roughly balanced tree
        return [-1] + [(i - 1) // 3 for i in range(1, num_nodes)]
    cases = [([-1, 0], [300]), (medusa_like(8), [300]), (medusa_like(64), [2000]),
             (medusa_like(16), [300] * 16), (list(range(-1, 4)), [0, 5, 1000])]
    return cases[:2] + cases[-1:] if quick else cases


def check_tree_mask(device: torch.device, repeats: int, quick: bool) -> list[dict]:
    rows = []
    for parents, prefix_lens in tree_cases(quick):
        parents_t = torch.tensor(parents, device=device)
        lens = torch.tensor(prefix_lens, device=device)
        expected = tree_attention_mask_reference(parents_t, lens)
        actual = tree_attention_mask_triton(parents_t, lens)
        ok = actual.shape == expected.shape and bool(torch.equal(actual, expected))
        rows.append({"kernel": "tree_attention_mask",
                     "shape": f"{len(parents)} nodes, prefixes {prefix_lens[:3]}{'...' if len(prefix_lens) > 3 else ''}"
                              f" (batch {len(prefix_lens)})",
                     "dtype": "bool", "max_abs_error": 0.0 if ok else float("nan"), "parity": ok,
                     "reference_ms": _timed(lambda: tree_attention_mask_reference(parents_t, lens), device, repeats),
                     "triton_ms": _timed(lambda: tree_attention_mask_triton(parents_t, lens), device, repeats)})
    return rows


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Kernel check on {env['device_name']} ({env['date']})", "",
             f"torch {env['torch']}, Triton {env['triton']}, Python {env['python']}; "
             f"`{report['command']}`. Median of {report['repeats']} timed calls after warm-up.", "",
             "| kernel | shape | dtype | parity | max abs error | reference ms | Triton ms | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['kernel']} | {row['shape']} | {row['dtype']} | {'ok' if row['parity'] else 'FAIL'} | "
                     f"{row['max_abs_error']:.2e} | {row['reference_ms']:.3f} | {row['triton_ms']:.3f} | "
                     f"{row['reference_ms'] / max(row['triton_ms'], 1e-9):.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a few shapes (the script's smoke test)")
    parser.add_argument("--output", help="folder for report.json and report.md (default: print only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (for a smoke test on CPU: TRITON_INTERPRET=1 --device cpu --quick)")
    import triton

    rows = check_trigram(device, args.repeats, args.quick) + check_tree_mask(device, args.repeats, args.quick)
    report = {"command": "python scripts/gpu_check.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (None, False)),
              "repeats": args.repeats, "rows": rows,
              "environment": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                              else platform.processor() or "cpu"),
                              "torch": torch.__version__, "triton": triton.__version__,
                              "python": platform.python_version()}}
    text = markdown(report)
    print(text)
    if args.output:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (output / "report.md").write_text(text)
    return 0 if all(row["parity"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
