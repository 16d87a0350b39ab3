"""Both Triton kernels compiled ahead of time for real GPUs (sm_80 and sm_90), no GPU needed.

What is compiled is what the dispatch code launches for its callers: chimera_kernels.launches
builds each launch with the wrappers' own launch code on meta tensors (vLLM's int32 ids, no
bias, every activation, bf16/fp16/fp32, d 576/896/4096, warm-up passes without prefix ids,
the tree mask's block shapes) and groups launches by Triton's compile key. Each kernel is
compiled for sm_80 (A100) and sm_90 (H100/H200) with the ptxas Triton ships, in a fresh
Triton cache, and fails on a compile error or on register spills beyond SPILL_BUDGET_BYTES.

    .venv/bin/python -m pytest tests/test_kernels_aot.py -q                       # a covering subset, < 1 min
    CHIMERA_FULL_AOT=1 .venv/bin/python -m pytest tests/test_kernels_aot.py -q    # every launch (~55 min CPU)
    .venv/bin/python -m chimera_kernels.aot [--full]                              # the same, as a table

The default run compiles launch_configs(full=False): greedily chosen kernels that together
cover every float and id dtype, activation, prefix or not, row-tile size per float dtype,
row-count specialisation and tree-mask block shape (24 of the 307 distinct kernels).
"""
import os

import pytest
import torch

from chimera_kernels import ACTIVATION_FUNCTIONS, launches
from chimera_kernels.aot import ARCHS, compile_launch

FULL = os.environ.get("CHIMERA_FULL_AOT", "") == "1"
CONFIGS = launches.launch_configs(full=FULL)

# Bytes of local memory a kernel may spill (ptxas's spill stores or loads, whichever is larger).
# Spills cost speed, never correctness, so the budget catches a kernel change that makes the
# register pressure jump, not the known cost below. fp32 trigram on sm_80 is the one exception:
# an fp32 tl.dot with input_precision="ieee" runs on FMA units there (no tensor cores), holding
# 64-wide fp32 tiles of E, W1 and the accumulator in registers; with 64-row tiles ptxas hits its
# 255-register cap and spills 2,124 B stored / 2,952 B loaded (measured 2026-12-07, Triton 3.9),
# 32-row tiles 224 / 428 B. On sm_90 the fp32 kernels take 94..212 registers and one of the 85
# spills 44 B (torch-draft int64 ids, identity, 64-row tiles: ptxas stopped at 168 registers);
# no 16-bit trigram kernel (tensor cores) and no tree-mask kernel spills on either arch.
# (Measured over all 307 kernels x 2 archs, 2026-12-07, Triton 3.9's ptxas.)
SPILL_BUDGET_BYTES = {(80, "fp32"): 4096, (90, "fp32"): 64}
DEFAULT_SPILL_BUDGET_BYTES = 0


def spill_budget(arch: int, config: launches.LaunchConfig) -> int:
    call = config.call
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        getattr(call, "dtype", None), "none")
    return SPILL_BUDGET_BYTES.get((arch, dtype), DEFAULT_SPILL_BUDGET_BYTES)


def config_id(config: launches.LaunchConfig) -> str:
    return config.describe().split(" [")[0].replace(" ", "-")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm{arch}")
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_compiles_without_spills(config, arch, tmp_path):
    report = compile_launch(config.launch(), arch, tmp_path)  # tmp_path: a fresh Triton cache
    budget = spill_budget(arch, config)
    assert report.spill_bytes <= budget, (
        f"sm_{arch}: {config.describe()} spills {report.spill_store_bytes} B stored / "
        f"{report.spill_load_bytes} B loaded ({report.registers} registers), budget {budget} B")
    if getattr(config.call, "dtype", torch.float32) != torch.float32:
        assert "mma" in report.ptx, "a 16-bit tl.dot should run on tensor cores (mma / wgmma)"


def test_enumeration_covers_what_vllm_launches():
    """The subset (and so the full set) reaches every axis vLLM's calls vary along."""
    subset = launches.launch_configs(full=False)
    trigram = [c.launch().constexprs | {"call": c.call} for c in subset if isinstance(c.call, launches.TrigramCall)]
    tree = [c.launch().constexprs for c in subset if isinstance(c.call, launches.TreeMaskCall)]
    assert {t["ACTIVATION"] for t in trigram} == set(ACTIVATION_FUNCTIONS)
    assert {t["call"].dtype for t in trigram} == {torch.float32, torch.bfloat16, torch.float16}
    assert {(t["call"].dtype, t["BLOCK_M"]) for t in trigram} == {
        (dtype, block) for dtype in (torch.float32, torch.bfloat16, torch.float16) for block in (16, 32, 64)}
    assert {t["HAS_PREFIX"] for t in trigram} == {True, False}
    assert any(t["call"].caller == "vllm" and t["call"].id_dtype == torch.int32 and not t["HAS_BIAS"]
               for t in trigram)
    assert {(t["BLOCK_I"], t["BLOCK_J"]) for t in tree} == {
        (i, j) for i in (4, 8, 16) for j in (4, 8, 16, 32, 64, 128) if j >= i}


@pytest.mark.parametrize("call", [
    launches.TrigramCall("vllm", torch.float32, torch.int32, "gelu", 64, 40, True),
    launches.TrigramCall("vllm", torch.float16, torch.int32, "silu", 64, 1, False),
    launches.TrigramCall("torch-draft", torch.float32, torch.int64, "relu", 96, 300, True),
    launches.TreeMaskCall("vllm", 5, 4),
    launches.TreeMaskCall("vllm", 19, 130),  # (T 17: bound 16 is 16-divisible, depth 2 is not)
], ids=lambda call: call.describe().replace(" ", "-"))
def test_enumerated_launch_is_the_wrappers_launch(call, monkeypatch):
    """A launch built on meta tensors compiles to the same kernel as the wrapper's real call.

    The wrapper runs on CPU tensors under the interpreter, with KernelLaunch.run replaced by a
    recorder (no kernel runs). bf16 is left out: the interpreter multiplies its tiles in fp32
    (DOT_IN_FP32), which a GPU launch never does. The trees' exact depth (CPU parents) and the
    T - 1 bound (GPU parents) fall in the same int specialisation here.
    """
    from chimera_kernels import _dispatch, tree_attention_mask_triton, trigram_encoder_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    recorded = []
    monkeypatch.setattr(_dispatch.KernelLaunch, "run", lambda launch: recorded.append(launch))
    if isinstance(call, launches.TrigramCall):
        trigram_encoder_triton(*call.inputs("cpu"))
    else:
        tree_attention_mask_triton(*call.inputs("cpu"))
    assert launches.compile_key(recorded[0]) == launches.compile_key(call.launch())
    assert recorded[0].grid == call.launch().grid
