"""The prepared device check: the GPU paths against CPU references, in one run of a few minutes.

Needs torch, Triton, transformers and this repository (kernels/ importable as chimera_kernels,
vllm_chimera on the path; scripts/gpu_check.sh arranges both): no vLLM, no network. Checks
    kernels      both Triton kernels on the launches the dispatch code makes for vLLM
                 (chimera_kernels.launches: int32 ids, no bias, every activation and float
                 dtype, d 576/896/4096, every tree-mask block shape) against the PyTorch
                 references computed on the CPU, with each compiled kernel's registers and
                 spills, and timed against the references on the same device; plus real
                 vocabularies (SmolLM2 49,152 x 576, Qwen2.5 151,936 x 896)
    host syncs   the kernel wrappers under torch.cuda.set_sync_debug_mode("error")
    draft        the Chimera draft's forward in torch (encoder over a batch of requests in two
                 chunks with its KV cache, the heads, top-k): GPU against CPU
    tree         vllm_chimera.vllm.tree_attention on a paged KV cache (blocks of 16, a
                 shuffled block table, GQA) against dense attention on the CPU

    bash scripts/gpu_check.sh                                  # on the GPU machine
    python scripts/gpu_check.py --output DIR [--full]          # --full: all 307 kernels (~10 min)
    TRITON_INTERPRET=1 python scripts/gpu_check.py --device cpu --quick --output DIR   # smoke test

The report (report.md, report.json) goes to --output, else $OUT (the folder the device tool
brings back), else results/gpu/<date>/. Exit status 1 if any check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from chimera_kernels import (tree_attention_mask_reference, tree_attention_mask_triton,
                             trigram_encoder_reference, trigram_encoder_triton)
from chimera_kernels.launches import LaunchConfig, TreeMaskCall, TrigramCall, launch_configs
from chimera_kernels.tree_mask import tree_mask_launch
from chimera_kernels.trigram import trigram_launch

# Triton output against the fp32 CPU reference of the same (rounded) inputs: fp32 is exact
# IEEE in both (only the summation order differs); 16-bit outputs are rounded once at the end.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
              torch.float16: dict(atol=3e-3, rtol=3e-3)}
REPO = Path(__file__).resolve().parent.parent


def _timed(fn, device: torch.device, repeats: int) -> float | None:
    """Median milliseconds of fn() over `repeats` calls, after warm-up (CUDA events on a GPU);
    None for repeats 0 (the smoke test: interpreted kernels take seconds a call)."""
    if repeats == 0:
        return None
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


def _compiled_stats(launch, device: torch.device) -> dict:
    """Registers and local memory (spills) of the kernel Triton compiled for this launch.

    Runs the launch once more (the kernel is cached by then); a GPU only: the interpreter
    compiles nothing.
    """
    if device.type != "cuda" or launch is None:
        return {"registers": None, "local_bytes": None}
    kernel = launch.run()
    n_regs, n_spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
    # Triton's n_spills is the local memory in 4-byte words (CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4).
    return {"registers": n_regs, "local_bytes": None if n_spills is None else 4 * n_spills}


def trigram_row(call: TrigramCall, device: torch.device, repeats: int, vocab: int = 1000) -> dict:
    inputs = call.inputs(device, vocab=vocab)  # (token_ids, cu_seqlens, embed, w1, bias, activation, prefix)
    actual = trigram_encoder_triton(*inputs).float().cpu()  # [num_tokens, d]
    # The reference on the CPU, in fp32 from the same rounded values (a 16-bit CPU matmul is slow).
    on_cpu = [t.cpu().float() if isinstance(t, torch.Tensor) and t.is_floating_point()
              else (t.cpu() if isinstance(t, torch.Tensor) else t) for t in inputs]
    expected = trigram_encoder_reference(*on_cpu)  # [num_tokens, d]
    return {"check": "kernel", "kernel": "trigram_encoder", "case": call.describe(),
            "max_abs_error": (actual - expected).abs().max().item(),
            "ok": torch.allclose(actual, expected, **TOLERANCES[call.dtype]),
            **_compiled_stats(trigram_launch(*inputs)[0], device),
            "triton_ms": _timed(lambda: trigram_encoder_triton(*inputs), device, repeats),
            "reference_ms": _timed(lambda: trigram_encoder_reference(*inputs), device, repeats)}


def tree_row(call: TreeMaskCall, device: torch.device, repeats: int) -> dict:
    parents, prefix_lens, max_kv_len = call.inputs(device)
    actual = tree_attention_mask_triton(parents, prefix_lens, max_kv_len).cpu()  # [1, T, max_kv_len]
    expected = tree_attention_mask_reference(parents.cpu(), prefix_lens.cpu(), max_kv_len)
    # The wrapper's launch on a GPU: parents unread, so the walk is bounded by T - 1.
    launch, _ = tree_mask_launch(parents.to(torch.int32), prefix_lens, max_kv_len, call.num_nodes - 1)
    return {"check": "kernel", "kernel": "tree_attention_mask", "case": call.describe(),
            "max_abs_error": (actual != expected).sum().item(), "ok": torch.equal(actual, expected),
            **_compiled_stats(launch, device),
            "triton_ms": _timed(lambda: tree_attention_mask_triton(parents, prefix_lens, max_kv_len),
                                device, repeats),
            "reference_ms": _timed(lambda: tree_attention_mask_reference(parents, prefix_lens, max_kv_len),
                                   device, repeats)}


def calls_to_run(config: LaunchConfig, quick: bool) -> list:
    """The calls of one compiled kernel to check: trigram at each hidden size, three trees
    (first, middle, last of the group); quick: only the first."""
    calls = list(config.calls)
    picked = calls if isinstance(config.call, TrigramCall) else [calls[0], calls[len(calls) // 2], calls[-1]]
    return list(dict.fromkeys(picked))[:1] if quick else list(dict.fromkeys(picked))


def check_kernels(device: torch.device, repeats: int, quick: bool, full: bool) -> list[dict]:
    rows = []
    for config in launch_configs(full=full):
        if quick and getattr(config.call, "num_tokens", 0) > 64:
            continue  # interpreted, 300 tokens take seconds a call and 2,048 a minute
        for call in calls_to_run(config, quick):
            run = trigram_row if isinstance(call, TrigramCall) else tree_row
            rows.append(_guarded(call.describe(), "kernel", lambda: run(call, device, repeats)))
    real = [(TrigramCall("vllm", torch.bfloat16, torch.int32, "silu", 576, 16, True), 49152),  # SmolLM2
            (TrigramCall("vllm", torch.bfloat16, torch.int32, "silu", 896, 16, True), 151936),  # Qwen2.5
            (TrigramCall("vllm", torch.bfloat16, torch.int32, "silu", 896, 2048, False), 151936)]
    for call, vocab in real[:1] if quick else real:
        row = _guarded(call.describe(), "kernel", lambda: trigram_row(call, device, repeats, vocab))
        rows.append(row | {"case": f"{row['case']}, vocab {vocab}"})
    return rows


def _guarded(case: str, check: str, fn) -> dict:
    """fn()'s row, or a failed row with the error: one broken check must not hide the others."""
    try:
        return fn()
    except Exception as error:  # reported in the row and in the exit status
        traceback.print_exc()
        return {"check": check, "case": case, "ok": False, "error": f"{type(error).__name__}: {error}"}


def check_host_syncs(device: torch.device) -> list[dict]:
    """The wrappers under torch.cuda.set_sync_debug_mode("error"): no device-to-host sync.

    The tree mask without max_kv_len must sync (its width is a value): that row shows the
    detector works. tree_attention.py's TreeStep.build (not a kernel wrapper) is reported only.
    """
    from vllm_chimera.vllm.tree_attention import TreeRows, TreeStep

    trigram_inputs = TrigramCall("vllm", torch.bfloat16, torch.int32, "silu", 576, 40, True).inputs(device)
    parents, prefix_lens, max_kv_len = TreeMaskCall("vllm", 9, 300).inputs(device)
    parents_on_cpu = parents.cpu()  # (made here: the copy back from the GPU is itself a sync)
    cases = [("trigram_encoder_triton (vLLM's call)", lambda: trigram_encoder_triton(*trigram_inputs), False),
             ("tree_attention_mask_triton, max_kv_len given",
              lambda: tree_attention_mask_triton(parents, prefix_lens, max_kv_len), False),
             ("tree_attention_mask_triton, CPU parents, max_kv_len given",
              lambda: tree_attention_mask_triton(parents_on_cpu, prefix_lens, max_kv_len), False),
             ("tree_attention_mask_triton, no max_kv_len (expected to sync)",
              lambda: tree_attention_mask_triton(parents, prefix_lens), True),
             ("TreeStep.build, the vLLM caller (reported, not judged)",
              lambda: TreeStep.build([TreeRows(0, 9, 300, 0, parents_on_cpu)], device), None)]
    rows = []
    for case, fn, expect_sync in cases:
        fn()  # compile outside the check
        if device.type != "cuda":  # (the smoke test: the calls run, syncs cannot be detected)
            rows.append({"check": "host sync", "case": f"{case}: not checked, needs CUDA", "ok": True})
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            synced = False
        except RuntimeError as error:
            if "synchroniz" not in str(error):
                raise
            synced = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows.append({"check": "host sync", "case": case, "synced": synced,
                     "ok": expect_sync is None or synced == expect_sync})
    return rows


def build_draft(seed: int = 0):
    """A random Chimera draft of SmolLM2-135M's shape (d 576, 9/3 heads, V 49,152, K 4) and
    the target's embedding and LM head it binds, on the CPU in fp32."""
    from vllm_chimera.config import ChimeraConfig
    from vllm_chimera.model import ChimeraDraftModel

    torch.manual_seed(seed)
    config = ChimeraConfig(initializer_range=0.05)
    draft = ChimeraDraftModel(config)
    for head in draft.heads:  # (heads start at zero: make them differ from the target's echo)
        torch.nn.init.normal_(head.down.weight, std=0.05)
    embed = torch.randn(config.vocab_size, config.hidden_size)  # [V, d]
    lm_head = torch.randn(config.vocab_size, config.hidden_size) / config.hidden_size ** 0.5  # [V, d]
    return draft.bind_target(embed, lm_head).eval(), embed, lm_head


def draft_forward(draft, inputs: dict, top_k: int = 4) -> dict:
    """Two encoder chunks through the draft's KV cache, then the heads on the last position."""
    from vllm_chimera.model import DraftKVCache

    kv_cache = DraftKVCache(draft.config.num_encoder_layers)
    with torch.inference_mode():
        s0 = draft.encode(inputs["ids0"], inputs["h0"], inputs["pos0"], inputs["prefix0"], kv_cache)
        s1 = draft.encode(inputs["ids1"], inputs["h1"], inputs["pos1"], inputs["prefix1"], kv_cache)
        h, s = inputs["h1"][:, -1], s1[:, -1]  # [B, d] each
        return {"s0": s0, "s1": s1, "logits": draft.head_logits(h, s),  # [K, B, V]
                "top": draft.propose(h, s, top_k)}  # [K, B, top_k]


def draft_inputs(config, batch: int = 4, first: int = 6, second: int = 2, seed: int = 1) -> dict:
    """A batch of requests: a prompt chunk of `first` positions, then `second` more (decode)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, first + second + 1), generator=gen)
    hidden = torch.randn(batch, first + second, config.hidden_size, generator=gen)  # h_t, ~RMS-normed
    positions = torch.arange(first + second).expand(batch, -1)
    fresh = torch.stack([torch.full((batch,), -1), tokens[:, 0]], dim=1)  # (-1, x_0): a fresh prompt
    return {"ids0": tokens[:, 1:first + 1], "h0": hidden[:, :first], "pos0": positions[:, :first],
            "prefix0": fresh, "ids1": tokens[:, first + 1:], "h1": hidden[:, first:],
            "pos1": positions[:, first:], "prefix1": tokens[:, first - 1:first + 1]}


def check_draft(device: torch.device, repeats: int) -> list[dict]:
    """The draft's forward on `device` (fp32, and bf16 as vLLM runs it) against fp32 on the CPU."""
    draft, embed, lm_head = build_draft()
    inputs = draft_inputs(draft.config)
    expected = draft_forward(draft, inputs)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        on_device = copy.deepcopy(draft).to(device, dtype).bind_target(embed.to(device, dtype),
                                                                       lm_head.to(device, dtype))
        moved = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        actual = {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                  for k, v in draft_forward(on_device, moved).items()}
        rows.append(_compare_draft(expected, actual, dtype) | {
            "forward_ms": _timed(lambda: draft_forward(on_device, moved), device, repeats)})
    return rows


def _compare_draft(expected: dict, actual: dict, dtype: torch.dtype) -> dict:
    """Relative errors of s and the logits; top-k: the chosen ids' CPU logits must equal the
    CPU's top-k logits (ids may differ only between near-equal logits)."""
    errors = {k: ((actual[k] - expected[k]).abs().max() / expected[k].abs().max()).item()
              for k in ("s0", "s1", "logits")}
    chosen = expected["logits"].gather(-1, actual["top"])  # [K, B, top_k] CPU logits of the device's picks
    best = expected["logits"].topk(actual["top"].shape[-1], dim=-1).values
    scale = expected["logits"].abs().max().item()
    top_error = (chosen - best).abs().max().item() / scale
    top1_agree = (actual["top"][..., 0] == expected["top"][..., 0]).float().mean().item()
    limit = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: ~3 significant digits per op
    return {"check": "draft", "case": f"draft forward {str(dtype).removeprefix('torch.')} vs fp32 on the CPU",
            **{f"{k}_rel_error": v for k, v in errors.items()}, "topk_rel_error": top_error,
            "top1_agreement": top1_agree, "ok": max(*errors.values(), top_error) <= limit}


def paged_tree_case(dtype: torch.dtype, seed: int = 0):
    """Four requests in a paged KV cache (blocks of 16, shuffled) and their queries.

    Requests (n cached tokens, tree): (5, 7 nodes), (37, 9 nodes), (100, 17 nodes), and
    (12, a chain of 4), which attend_tree_rows must leave alone. Returns the dense keys and
    values per request ([n + T, kv_heads, head_size] each), the paged cache, the block table
    [4, max_blocks], the queries [num_rows, heads, head_size] and the TreeRows.
    """
    from vllm_chimera.vllm.tree_attention import KVLayout, TreeRows

    num_heads, num_kv_heads, head_size, block_size = 6, 2, 64, 16
    specs = [(5, [-1] + [(i - 1) // 3 for i in range(1, 7)]), (37, [-1] + [(i - 1) // 3 for i in range(1, 9)]),
             (100, [-1] + [(i - 1) // 2 for i in range(1, 17)]), (12, [-1, 0, 1, 2])]
    gen = torch.Generator().manual_seed(seed)
    blocks_per_request = [-(-(n + len(p)) // block_size) for n, p in specs]
    block_ids = torch.randperm(sum(blocks_per_request) + 3, generator=gen)  # shuffled, some unused
    block_table = torch.zeros(len(specs), max(blocks_per_request), dtype=torch.int32)
    kv_cache = torch.zeros(len(block_ids), num_kv_heads, block_size, 2 * head_size).to(dtype)
    dense, rows, first_row = [], [], 0
    for r, ((n, parents), num_blocks) in enumerate(zip(specs, blocks_per_request)):
        block_table[r, :num_blocks], block_ids = block_ids[:num_blocks], block_ids[num_blocks:]
        entries = torch.randn(n + len(parents), num_kv_heads, 2, head_size, generator=gen).to(dtype)
        slots = torch.arange(n + len(parents))
        KVLayout(head_size).scatter(kv_cache, block_table[r].long()[slots // block_size],
                                    slots % block_size, entries)
        dense.append(entries)
        rows.append(TreeRows(first_row, len(parents), n, r, torch.tensor(parents)))
        first_row += len(parents)
    query = torch.randn(first_row, num_heads, head_size, generator=gen).to(dtype)
    return dense, kv_cache, block_table, query, rows


def dense_tree_attention(query: torch.Tensor, entries: torch.Tensor, row: "TreeRows", scale: float):
    """One request's tree rows by dense attention in fp32: [T, heads, head_size]."""
    q = query[row.first_row:row.first_row + row.num_nodes].float().transpose(0, 1)  # [H, T, d]
    group = q.shape[0] // entries.shape[1]
    k, v = (entries[:, :, i].float().repeat_interleave(group, dim=1).transpose(0, 1) for i in (0, 1))  # [H, L, d]
    allowed = tree_attention_mask_reference(row.parents, torch.tensor([row.num_computed]))[0]  # [T, L]
    scores = (q @ k.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))  # [H, T, L]
    return (scores.softmax(dim=-1) @ v).transpose(0, 1)


def check_tree_attention(device: torch.device) -> list[dict]:
    """vllm_chimera's tree attention over the GPU backends' paged layout vs dense on the CPU."""
    import sys

    from vllm_chimera.vllm.tree_attention import KVLayout, TreeStep, attend_tree_rows
    if "vllm" in sys.modules:
        raise RuntimeError("vllm_chimera.vllm.tree_attention imported vllm: the GPU machine has none")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        dense, kv_cache, block_table, query, requests = paged_tree_case(dtype)
        scale = query.shape[-1] ** -0.5
        untouched = torch.full_like(query, 7.0)  # what the backend's causal kernel wrote
        output = untouched.to(device)
        step = TreeStep.build(requests, device)
        attend_tree_rows(query.to(device), kv_cache.to(device), KVLayout(query.shape[-1]),
                         block_table.to(device), step, scale, output)
        output = output.float().cpu()
        error, chain_kept = 0.0, True
        for entries, row in zip(dense, requests):
            got = output[row.first_row:row.first_row + row.num_nodes]
            if row.parents.tolist() == list(range(-1, row.num_nodes - 1)):  # a chain: not recomputed
                chain_kept = torch.equal(got, untouched[row.first_row:row.first_row + row.num_nodes].float())
            else:
                error = max(error, (got - dense_tree_attention(query, entries, row, scale)).abs().max().item())
        limit = 1e-4 if dtype == torch.float32 else 2e-2
        rows.append({"check": "tree attention", "ok": error <= limit and chain_kept, "max_abs_error": error,
                     "case": f"paged KV (blocks of 16, shuffled), 6/2 heads, trees of 7, 9, 17 nodes "
                             f"+ a chain, {str(dtype).removeprefix('torch.')}",
                     "chain_rows_untouched": chain_kept})
    return rows


def _cell(value) -> str:
    if isinstance(value, bool):
        return "ok" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check on {env['device_name']} ({env['date']})", "",
             f"torch {env['torch']}, Triton {env['triton']}, Python {env['python']}; `{report['command']}`; "
             f"{report['seconds']:.0f} s. " + (f"Times: median of {report['repeats']} calls after warm-up. "
                                               if report["repeats"] else "No timings (--quick). ") +
             f"{'All checks passed.' if report['ok'] else '**Some checks FAILED.**'}", ""]
    columns = {"kernel": ["case", "ok", "max_abs_error", "registers", "local_bytes", "triton_ms", "reference_ms"],
               "host sync": ["case", "ok", "synced"],
               "draft": ["case", "ok", "s0_rel_error", "s1_rel_error", "logits_rel_error", "topk_rel_error",
                         "top1_agreement", "forward_ms"],
               "tree attention": ["case", "ok", "max_abs_error", "chain_rows_untouched"]}
    for check, names in columns.items():
        rows = [row for row in report["rows"] if row["check"] == check]
        lines += [f"## {check}", "", "| " + " | ".join(names + ["error"]) + " |",
                  "|" + "---|" * (len(names) + 1)]
        lines += ["| " + " | ".join(_cell(row.get(name)) for name in names + ["error"]) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def default_output() -> Path:
    """$OUT (the folder the device tool brings back), else results/gpu/<date>/."""
    return Path(os.environ.get("OUT") or REPO / "results" / "gpu" / datetime.now(timezone.utc).strftime("%Y-%m-%d"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="one call per kernel, no timings (smoke test)")
    parser.add_argument("--full", action="store_true", help="every compiled kernel, not the covering subset")
    parser.add_argument("--output", type=Path, help="report folder (default: $OUT, else results/gpu/<date>)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (for a smoke test on CPU: TRITON_INTERPRET=1 --device cpu --quick)")
    import triton

    repeats = 0 if args.quick else args.repeats
    start = time.perf_counter()
    rows = _guarded_rows("kernel", lambda: check_kernels(device, repeats, args.quick, args.full))
    rows += _guarded_rows("host sync", lambda: check_host_syncs(device))
    rows += _guarded_rows("draft", lambda: check_draft(device, repeats))
    rows += _guarded_rows("tree attention", lambda: check_tree_attention(device))
    flags = [f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)]
    report = {"command": "python scripts/gpu_check.py " + " ".join(flags),
              "repeats": repeats, "seconds": time.perf_counter() - start,
              "ok": all(row["ok"] for row in rows), "rows": rows,
              "environment": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                              else platform.processor() or "cpu"),
                              "torch": torch.__version__, "triton": triton.__version__,
                              "python": platform.python_version()}}
    text = markdown(report)
    print(text)
    output = args.output or default_output()
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "report.md").write_text(text)
    print(f"report: {output}")
    return 0 if report["ok"] else 1


def _guarded_rows(check: str, fn) -> list[dict]:
    rows = _guarded(check, check, fn)
    return rows if isinstance(rows, list) else [rows]


if __name__ == "__main__":
    raise SystemExit(main())
