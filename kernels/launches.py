"""Every kernel launch the dispatch code makes for its callers, enumerated.

A *call* is what a caller hands a wrapper (dtypes, sizes, optional arguments). The wrapper's
own launch function (trigram_launch, tree_mask_launch: the code that runs on every real
call) turns it, on meta tensors, into a KernelLaunch; launches are then grouped by Triton's
compile key, i.e. how Triton specialises each argument (pointer dtypes, tl.constexpr values,
ints equal to 1 become constants, ints and pointers divisible by 16 get a divisibility hint).
One group = one kernel Triton compiles on a GPU. Used by tests/test_kernels_aot.py (ahead of
time compiles for sm_80/sm_90) and scripts/gpu_check.py (the same launches on a real GPU).

The callers, as read from the code:
  trigram_encoder
    vllm         vllm_chimera/vllm/model.py (ChimeraProposer.propose): input_ids int32,
                 cu_seqlens = query_start_loc int32, prefix_ids int64 [num_reqs, 2], no bias;
                 warm-up (dummy_run) passes no prefix_ids. E and W1 in the model dtype,
                 activation = config.trigram_activation, W1: 3d -> d.
    torch-draft  vllm_chimera/model.py (reference decoder, evaluation on a GPU): int64 ids,
                 int32 cu_seqlens, int64 prefix_ids, no bias.
    api          the bias option, which no caller passes (full set only, to keep it compiling).
  tree_attention_mask
    vllm         vllm_chimera/vllm/tree_attention.py: one request per call (B = 1), T >= 3
                 nodes (a chain gets no mask), prefix_lens int64, max_kv_len = n + T with
                 n >= 1 cached tokens; parents on the GPU (so the walk is bounded by T - 1).
                 The reference decoder (reference.py) calls it the same way.

Sizes: d in HIDDEN_SIZES (d never changes the compiled kernel: every real d is a multiple of
64, so the block sizes and hints are the same; the calls keep them for the GPU check), token
counts chosen to reach every row block and every int specialisation of num_tokens, trees of
3..MAX_TREE_NODES nodes after 1..PREFIX_SCAN cached tokens (past 128 columns the block shape
no longer changes, so longer prefixes repeat keys already seen).
"""
from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass

import torch

from chimera_kernels._dispatch import FLOAT_DTYPES, KernelLaunch
from chimera_kernels.tree_mask import _check_inputs as _check_tree_inputs
from chimera_kernels.tree_mask import tree_mask_launch
from chimera_kernels.trigram import _check_inputs as _check_trigram_inputs
from chimera_kernels.trigram import ACTIVATIONS, trigram_launch

HIDDEN_SIZES = (576, 896, 4096)  # SmolLM2-135M, Qwen2.5-0.5B, a 7-8B target
# 1 (an int Triton makes a constant), 3, 16 (16-divisible) -> 16-row tiles; 40, 64 -> 32-row
# tiles; 300, 2048 (a warm-up pass over the whole token budget) -> 64-row tiles.
TOKEN_COUNTS = (1, 3, 16, 40, 64, 300, 2048)
MAX_TREE_NODES = 64  # Medusa's largest static tree; the shipped trees have 7..17 nodes
PREFIX_SCAN = 144  # cached tokens 1..144: max_kv_len reaches past 128 columns with every residue mod 16

_NAMES = {torch.int32: "int32", torch.int64: "int64", torch.float32: "fp32", torch.bfloat16: "bf16",
          torch.float16: "fp16"}


@dataclass(frozen=True)
class TrigramCall:
    """One way a caller calls trigram_encoder."""

    caller: str
    dtype: torch.dtype  # of E and W1 (and the output)
    id_dtype: torch.dtype  # of token_ids
    activation: str
    d: int  # hidden size; W1 is [d, 3d]
    num_tokens: int
    with_prefix: bool
    with_bias: bool = False

    @property
    def seqlens(self) -> list[int]:
        """Up to 4 requests of uneven lengths packed together: 40 -> [1, 2, 10, 27], 3 -> [1, 2]."""
        lens, left = [], self.num_tokens
        for n in (1, 2, self.num_tokens // 4):
            if 0 < n < left:
                lens.append(n)
                left -= n
        return lens + [left]

    def inputs(self, device: torch.device | str, vocab: int = 1000, seed: int = 0) -> tuple:
        """Random arguments of trigram_encoder: (token_ids, cu_seqlens, embed, w1, bias,
        activation, prefix_ids), on `device` (a small vocabulary: it changes no launch)."""
        gen = torch.Generator().manual_seed(seed)
        seqlens = self.seqlens
        token_ids = torch.randint(0, vocab, (self.num_tokens,), generator=gen)  # [num_tokens]
        cu_seqlens = torch.tensor([0] + seqlens).cumsum(0)  # [num_seqs + 1]
        embed = torch.randn(vocab, self.d, generator=gen)  # [vocab, d]
        w1 = torch.randn(self.d, 3 * self.d, generator=gen) / (3 * self.d) ** 0.5  # [d, 3d]
        bias = 0.1 * torch.randn(self.d, generator=gen) if self.with_bias else None  # [d]
        # -1 ("before the start") in some rows, as a fresh prompt gives
        prefix = torch.randint(-1, vocab, (len(seqlens), 2), generator=gen) if self.with_prefix else None
        to = functools.partial(torch.Tensor.to, device=device)
        return (to(token_ids, dtype=self.id_dtype), to(cu_seqlens, dtype=torch.int32),
                to(embed, dtype=self.dtype), to(w1, dtype=self.dtype),
                None if bias is None else to(bias, dtype=self.dtype), self.activation,
                None if prefix is None else to(prefix, dtype=torch.int64))

    def launch(self) -> KernelLaunch:
        """The launch trigram_encoder_triton makes for this call (built on meta tensors)."""
        meta = dict(device="meta")
        num_seqs = len(self.seqlens)
        args = (torch.empty(self.num_tokens, dtype=self.id_dtype, **meta),
                torch.empty(num_seqs + 1, dtype=torch.int32, **meta),
                torch.empty(1000, self.d, dtype=self.dtype, **meta),
                torch.empty(self.d, 3 * self.d, dtype=self.dtype, **meta),
                torch.empty(self.d, dtype=self.dtype, **meta) if self.with_bias else None, self.activation,
                torch.empty(num_seqs, 2, dtype=torch.int64, **meta) if self.with_prefix else None)
        _check_trigram_inputs(*args)  # the wrapper's whole host path: meta tensors have no values to read
        launch, _ = trigram_launch(*args)
        return launch

    def describe(self) -> str:
        return (f"trigram {_NAMES[self.dtype]} {self.activation} ids {_NAMES[self.id_dtype]} "
                f"{'prefix' if self.with_prefix else 'no prefix'}{' bias' if self.with_bias else ''} "
                f"d {self.d} tokens {self.num_tokens} ({self.caller})")


@dataclass(frozen=True)
class TreeMaskCall:
    """One way a caller calls tree_attention_mask (one request: B = 1)."""

    caller: str
    num_nodes: int  # T
    prefix_len: int  # n, KV entries cached before the root

    @property
    def parents(self) -> list[int]:
        """A Medusa-like tree: node i's parent is (i - 1) // 3 (e.g. 7 nodes: [-1, 0, 0, 0, 1, 1, 1])."""
        return [-1] + [(i - 1) // 3 for i in range(1, self.num_nodes)]

    @property
    def max_kv_len(self) -> int:
        return self.prefix_len + self.num_nodes

    def inputs(self, device: torch.device | str) -> tuple:
        """(parents, prefix_lens, max_kv_len) as tree_attention.py passes them."""
        return (torch.tensor(self.parents, device=device),
                torch.tensor([self.prefix_len], device=device), self.max_kv_len)

    def launch(self) -> KernelLaunch:
        """The launch tree_attention_mask_triton makes for this call (built on meta tensors)."""
        parents = torch.empty(self.num_nodes, dtype=torch.int32, device="meta")  # on the GPU
        prefix_lens = torch.empty(1, dtype=torch.int64, device="meta")
        max_kv_len, depth = _check_tree_inputs(parents, prefix_lens, self.max_kv_len)
        launch, _ = tree_mask_launch(parents, prefix_lens, max_kv_len, depth)
        return launch

    def describe(self) -> str:
        return f"tree_mask T {self.num_nodes} after {self.prefix_len} ({self.caller})"


def trigram_calls(full: bool = True) -> list[TrigramCall]:
    """Every trigram_encoder call of the callers in the module docstring (and the bias option)."""
    calls = []
    for caller, id_dtype, prefixes in (("vllm", torch.int32, (True, False)),  # (no prefix: warm-up)
                                       ("torch-draft", torch.int64, (True,))):
        calls += [TrigramCall(caller, dtype, id_dtype, activation, d, num_tokens, with_prefix)
                  for dtype, activation, d, num_tokens, with_prefix
                  in itertools.product(FLOAT_DTYPES, ACTIVATIONS, HIDDEN_SIZES, TOKEN_COUNTS, prefixes)]
    if full:
        calls += [TrigramCall("api", dtype, torch.int64, "silu", 576, 40, True, with_bias=True)
                  for dtype in FLOAT_DTYPES]
    return calls


def tree_mask_calls() -> list[TreeMaskCall]:
    """Every tree_attention_mask call shape of vLLM's tree verification (see the module docstring)."""
    return [TreeMaskCall("vllm", num_nodes, prefix_len)
            for num_nodes in range(3, MAX_TREE_NODES + 1) for prefix_len in range(1, PREFIX_SCAN + 1)]


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel as Triton compiles it, and the calls that launch it."""

    key: tuple  # compile_key(launch)
    calls: tuple  # the TrigramCall / TreeMaskCall objects with this key, first one representative

    @property
    def call(self):
        return self.calls[0]

    def launch(self) -> KernelLaunch:
        return self.call.launch()

    def describe(self) -> str:
        constexprs = self.launch().constexprs
        blocks = "x".join(str(v) for k, v in constexprs.items() if k.startswith("BLOCK_"))
        return f"{self.call.describe()} [blocks {blocks}, {len(self.calls)} calls]"


def specialization(launch: KernelLaunch) -> dict[str, tuple[str, object]]:
    """How Triton specialises each argument of this launch: name -> (type, attribute).

    Triton's own rule (the function JITFunction.run calls): ("constexpr", value) for
    tl.constexpr arguments and ints equal to 1, ("i32", "D") for an int divisible by 16,
    ("*bf16", "D") for a 16-byte-aligned bf16 pointer (meta tensors count as aligned, as
    CUDA allocations are), ...
    """
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    spec = {}
    for name in inspect.signature(launch.kernel).parameters:
        if name in launch.constexprs:
            spec[name] = ("constexpr", launch.constexprs[name])
        else:  # (is_const=False, specialize=True, align=True): JITFunction's defaults
            spec[name] = tuple(native_specialize_impl(BaseBackend, launch.args[name], False, True, True))
    return spec


def compile_key(launch: KernelLaunch) -> tuple:
    """Equal for two launches iff Triton compiles them to the same kernel."""
    return (launch.kernel.__name__, *sorted(specialization(launch).items()))


def launch_configs(full: bool = True, kernels: tuple[str, ...] = ("trigram", "tree_mask")) -> list[LaunchConfig]:
    """The distinct kernels the dispatch code launches for its callers (see the module docstring).

    full=False: a representative subset: configs picked greedily (most new features first)
    until every value of every feature is covered: float and id dtypes, activation, prefix or
    not, the row count's specialisation (1 / 16-divisible / other), each float dtype with each
    row tile (fp32 and 16-bit dots use different code, and register pressure grows with the
    tile), and every tree-mask block shape.
    """
    calls = (trigram_calls(full) if "trigram" in kernels else []) + (
        tree_mask_calls() if "tree_mask" in kernels else [])
    groups: dict[tuple, list] = {}
    for call in calls:
        groups.setdefault(compile_key(call.launch()), []).append(call)
    configs = [LaunchConfig(key, tuple(group)) for key, group in groups.items()]
    return configs if full else _covering_subset(configs)


def _features(config: LaunchConfig) -> set[tuple]:
    """What the subset must cover, read from the launch, e.g. ("ACTIVATION", "gelu")."""
    spec = specialization(config.launch())
    features = {(name, str(value[1])) for name, value in spec.items()
                if value[0] == "constexpr" and name.isupper()}  # tl.constexpr: blocks, activation, ...
    features |= {(name, value[0]) for name, value in spec.items() if name.endswith("_ptr")}  # dtypes
    if "num_tokens" in spec:  # the trigram kernel
        features.add(("num_tokens", str(spec["num_tokens"][1])))  # 1 / "D" (16-divisible) / ""
        features.add(("embed_ptr x BLOCK_M", spec["embed_ptr"][0], spec["BLOCK_M"][1]))
    else:
        features.add(("BLOCK_I x BLOCK_J", spec["BLOCK_I"][1], spec["BLOCK_J"][1]))
    return {(config.key[0], *feature) for feature in features}


def _covering_subset(configs: list[LaunchConfig]) -> list[LaunchConfig]:
    """Greedy set cover: repeatedly the config with the most uncovered features (first on ties)."""
    features = [_features(config) for config in configs]
    uncovered, subset = set().union(*features), []
    while uncovered:
        best = max(range(len(configs)), key=lambda i: len(features[i] & uncovered))
        subset.append(best)
        uncovered -= features[best]
    return [configs[i] for i in sorted(subset)]  # in enumeration order
