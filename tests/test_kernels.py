"""Triton kernels (run by Triton's interpreter on CPU) against their PyTorch references.

Run: .venv/bin/python -m pytest tests/test_kernels.py -q
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import chimera_kernels
from chimera_kernels import (tree_attention_mask, tree_attention_mask_reference,
                             tree_attention_mask_triton, trigram_encoder, trigram_encoder_reference,
                             trigram_encoder_triton, trigram_window_ids)


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    """Interpret Triton kernels (no GPU here) for this module's tests only.

    chimera_kernels decorates its kernels on first use, per interpret flag, so setting the
    variable here is enough. It must not leak: vLLM reads it too and then runs its own
    Triton kernels (e.g. the rejection sampler) in the interpreter, which broke
    sampling losslessness in a later vLLM test when this was set at import time.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous

# The kernel's sigmoid is 1 / (1 + exp(-x)); the interpreter's numpy warns when exp overflows
# for very negative x (the result, 0, is right).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def make_trigram_inputs(seqlens, d, d_out, dtype=torch.float32, vocab=50, with_prefix=False,
                        with_bias=True, seed=0):
    """Seeded random (never zero) inputs at nn.Linear-like scale, so activations see both signs."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(seqlens)
    token_ids = torch.randint(0, vocab, (num_tokens,), generator=gen)  # [num_tokens]
    cu_seqlens = torch.tensor([0] + seqlens).cumsum(0).to(torch.int32)  # [num_seqs + 1]
    embed = torch.randn(vocab, d, generator=gen).to(dtype)  # [vocab, d]
    w1 = (torch.randn(d_out, 3 * d, generator=gen) / (3 * d) ** 0.5).to(dtype)  # [d_out, 3d]
    bias = (0.1 * torch.randn(d_out, generator=gen)).to(dtype) if with_bias else None  # [d_out]
    prefix = None
    if with_prefix:  # cycle through every known/unknown (-1) combination of (p0, p1)
        prefix = torch.randint(0, vocab, (len(seqlens), 2), generator=gen)  # [num_seqs, 2]
        unknown = torch.tensor([[False, False], [True, True], [True, False], [False, True]])
        prefix[unknown.repeat(len(seqlens), 1)[:len(seqlens)]] = -1
    return token_ids, cu_seqlens, embed, w1, bias, prefix


def assert_trigram_close(args, activation, dtype):
    token_ids, cu_seqlens, embed, w1, bias, prefix = args
    expected = trigram_encoder_reference(token_ids, cu_seqlens, embed, w1, bias, activation, prefix)
    actual = trigram_encoder_triton(token_ids, cu_seqlens, embed, w1, bias, activation, prefix)
    assert actual.dtype == expected.dtype == dtype
    assert actual.shape == expected.shape == (token_ids.shape[0], w1.shape[0])
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])


# ---------------------------------------------------------------- trigram: reference by hand

def test_window_ids_worked_example():
    token_ids, cu_seqlens = torch.tensor([10, 11, 12, 20, 30, 31]), torch.tensor([0, 3, 4, 6])
    assert trigram_window_ids(token_ids, cu_seqlens).tolist() == [
        [10, 10, 10], [10, 10, 11], [10, 11, 12], [20, 20, 20], [30, 30, 30], [30, 30, 31]]
    prefix = torch.tensor([[-1, -1], [5, 6], [-1, 7]])
    assert trigram_window_ids(token_ids, cu_seqlens, prefix).tolist() == [
        [10, 10, 10], [10, 10, 11], [10, 11, 12], [5, 6, 20], [7, 7, 30], [7, 30, 31]]
    # p0 known, p1 unknown: the unknown slot takes the first known token, p0.
    windows = trigram_window_ids(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([[9, -1]]))
    assert windows.tolist() == [[9, 9, 1], [9, 1, 2]]
    # An empty sequence in the middle changes nothing for its neighbours.
    assert trigram_window_ids(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1, 3])).tolist() == [
        [1, 1, 1], [2, 2, 2], [2, 2, 3]]


def test_reference_one_token_sequence_repeats_x0():
    _, _, embed, w1, bias, _ = make_trigram_inputs([1], d=8, d_out=6)
    x0 = 7
    out = trigram_encoder_reference(torch.tensor([x0]), torch.tensor([0, 1]), embed, w1, bias, "silu")
    e = embed[x0]
    expected = F.silu(w1 @ torch.cat([e, e, e]) + bias)
    torch.testing.assert_close(out, expected[None])


def test_reference_block_order():
    """Column block 0 of W1 multiplies E(x_{t-2}), block 1 E(x_{t-1}), block 2 E(x_t)."""
    d = 5
    _, _, embed, w1, _, _ = make_trigram_inputs([3], d=d, d_out=4)
    out = trigram_encoder_reference(torch.tensor([3, 4, 5]), torch.tensor([0, 3]), embed, w1, None,
                                    "identity", torch.tensor([[1, 2]]))
    blocks = w1[:, :d], w1[:, d:2 * d], w1[:, 2 * d:]
    for t, (a, b, c) in enumerate([(1, 2, 3), (2, 3, 4), (3, 4, 5)]):
        expected = blocks[0] @ embed[a] + blocks[1] @ embed[b] + blocks[2] @ embed[c]
        torch.testing.assert_close(out[t], expected)


# ---------------------------------------------------------------- trigram: Triton vs reference

SHAPES = [  # (seqlens, d, d_out); block sizes are 16/32 rows, <= 64 features: none of these divide evenly
    ([1], 24, 24),
    ([2], 64, 40),
    ([1, 2, 5], 24, 96),
    ([17, 1, 2, 20], 96, 64),
    ([3, 0, 4], 64, 24),  # an empty sequence
    ([40, 24], 24, 48),  # 64 tokens, two row tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("seqlens,d,d_out", SHAPES)
def test_trigram_triton_shapes(seqlens, d, d_out, with_prefix, dtype):
    args = make_trigram_inputs(seqlens, d, d_out, dtype, with_prefix=with_prefix, with_bias=with_prefix)
    assert_trigram_close(args, "silu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "identity"])
def test_trigram_triton_activations(activation, with_bias, dtype):
    args = make_trigram_inputs([1, 2, 9, 6], d=24, d_out=40, dtype=dtype, with_prefix=True,
                               with_bias=with_bias, seed=1)
    assert_trigram_close(args, activation, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trigram_triton_non_contiguous(dtype):
    token_ids, cu_seqlens, embed, w1, bias, prefix = make_trigram_inputs(
        [5, 1, 2, 11], d=24, d_out=40, dtype=dtype, with_prefix=True, seed=2)
    wide_ids = torch.full((2 * token_ids.shape[0],), 10**6)  # out-of-vocab filler: reading it would fail
    wide_ids[::2] = token_ids
    wide_embed = torch.randn(embed.shape[0], 3 * embed.shape[1]).to(dtype)
    wide_embed[:, 24:48] = embed
    wide_prefix = torch.full((prefix.shape[0], 4), 10**6)
    wide_prefix[:, ::2] = prefix
    wide_bias = torch.randn(2 * bias.shape[0]).to(dtype)
    wide_bias[::2] = bias
    args = (
        wide_ids[::2],  # stride 2
        cu_seqlens.long(),
        wide_embed[:, 24:48],  # a column slice of a wider table: stride (72, 1)
        w1.t().contiguous().t(),  # transposed storage: stride (1, d_out)
        wide_bias[::2],
        wide_prefix[:, ::2],  # stride (4, 2)
    )
    assert not any(t.is_contiguous() for t in (args[0], args[2], args[3], args[4], args[5]))
    assert_trigram_close(args, "gelu", dtype)
    contiguous = [t.contiguous() for t in args]
    torch.testing.assert_close(trigram_encoder_triton(*args[:5], "gelu", args[5]),
                               trigram_encoder_reference(*contiguous[:5], "gelu", contiguous[5]),
                               **TOLERANCES[dtype])


def test_trigram_triton_no_tokens():
    token_ids, cu_seqlens, embed, w1, bias, _ = make_trigram_inputs([], d=24, d_out=40)
    assert trigram_encoder_triton(token_ids, cu_seqlens, embed, w1, bias).shape == (0, 40)
    assert trigram_encoder_reference(token_ids, cu_seqlens, embed, w1, bias).shape == (0, 40)


# ---------------------------------------------------------------- trigram: errors

def _bad_trigram_inputs():
    token_ids, cu_seqlens, embed, w1, bias, prefix = make_trigram_inputs([2, 3], d=8, d_out=6,
                                                                         with_prefix=True)
    good = dict(token_ids=token_ids, cu_seqlens=cu_seqlens, embed_weight=embed, w1=w1, bias=bias,
                activation="silu", prefix_ids=prefix)
    cases = {
        "activation": dict(activation="tanh"),
        "3 \\* d": dict(w1=w1[:, :-1]),
        "w1 dtype": dict(w1=w1.double()),
        "bias": dict(bias=bias[:-1]),
        "cu_seqlens\\[-1\\]": dict(cu_seqlens=torch.tensor([0, 2, 4])),
        "cu_seqlens\\[0\\]": dict(cu_seqlens=torch.tensor([1, 2, 5])),
        "non-decreasing": dict(cu_seqlens=torch.tensor([0, 3, 2, 5]), prefix_ids=None),
        "prefix_ids": dict(prefix_ids=prefix[:1]),
        "token_ids must be in": dict(token_ids=torch.tensor([0, 1, 2, 3, 50])),
        "token_ids must be a 1-D": dict(token_ids=token_ids.float()),
    }
    return [(good | change, match) for match, change in cases.items()]


@pytest.mark.parametrize("impl", [trigram_encoder_reference, trigram_encoder_triton, trigram_encoder])
@pytest.mark.parametrize("kwargs,match", _bad_trigram_inputs())
def test_trigram_errors(impl, kwargs, match):
    with pytest.raises(ValueError, match=match):
        impl(**kwargs)


# ---------------------------------------------------------------- tree mask

def random_tree(num_nodes, gen):
    return torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, num_nodes)])


def test_tree_mask_worked_example():
    parents = torch.tensor([-1, 0, 0, 1])  # root -> {A, B}, A -> {C}
    expected = torch.tensor([
        # prefix root A  B  C  pad
        [1, 1, 1, 0, 0, 0, 0],  # root
        [1, 1, 1, 1, 0, 0, 0],  # A
        [1, 1, 1, 0, 1, 0, 0],  # B
        [1, 1, 1, 1, 0, 1, 0],  # C
    ], dtype=torch.bool)
    for impl in (tree_attention_mask_reference, tree_attention_mask_triton):
        assert torch.equal(impl(parents, torch.tensor([2]), max_kv_len=7), expected[None])
        # Default width is max(prefix_lens) + T; a shorter prefix shifts the tree block left.
        mask = impl(parents, torch.tensor([2, 0]))
        assert mask.shape == (2, 4, 6) and mask.dtype == torch.bool
        assert torch.equal(mask[0], expected[:, :6])
        shifted = torch.cat([expected[:, 2:6], torch.zeros(4, 2, dtype=torch.bool)], dim=1)
        assert torch.equal(mask[1], shifted)


TREES = {
    "root only": [-1],
    "chain": list(range(-1, 15)),  # depth 15
    "star": [-1] + [0] * 20,
    "medusa-like": [-1, 0, 0, 0, 1, 1, 2, 4, 4, 5, 7],
}


@pytest.mark.parametrize("max_kv_pad", [0, 37])
@pytest.mark.parametrize("name", TREES)
def test_tree_mask_triton_fixed_trees(name, max_kv_pad):
    parents = torch.tensor(TREES[name])
    prefix_lens = torch.tensor([0, 5, 130, 17])  # 130 + T spans two column tiles
    max_kv_len = int(prefix_lens.max()) + len(parents) + max_kv_pad
    expected = tree_attention_mask_reference(parents, prefix_lens, max_kv_len)
    assert torch.equal(tree_attention_mask_triton(parents, prefix_lens, max_kv_len), expected)


@pytest.mark.parametrize("seed", range(4))
def test_tree_mask_triton_random_trees(seed):
    gen = torch.Generator().manual_seed(seed)
    num_nodes = [5, 26, 40, 17][seed]  # > 16 query rows means two row tiles
    parents = random_tree(num_nodes, gen).to(torch.int32 if seed % 2 else torch.int64)
    prefix_lens = torch.randint(0, 60, (seed + 1,), generator=gen)
    expected = tree_attention_mask_reference(parents, prefix_lens)
    assert torch.equal(tree_attention_mask_triton(parents, prefix_lens), expected)
    # Independent check of the reference: walk each node's root path in Python.
    for i in range(num_nodes):
        path, node = set(), i
        while node >= 0:
            path.add(node)
            node = int(parents[node])
        for b, prefix in enumerate(prefix_lens.tolist()):
            row = expected[b, i]
            assert row[:prefix].all() and not row[prefix + num_nodes:].any()
            assert set(row[prefix:prefix + num_nodes].nonzero().flatten().tolist()) == path


def test_tree_mask_triton_non_contiguous_prefix_lens():
    parents, wide = torch.tensor(TREES["medusa-like"]), torch.tensor([3, 99, 0, 99, 12, 99])
    assert torch.equal(tree_attention_mask_triton(parents, wide[::2]),
                       tree_attention_mask_reference(parents, wide[::2].contiguous()))


@pytest.mark.parametrize("impl", [tree_attention_mask_reference, tree_attention_mask_triton,
                                  tree_attention_mask])
@pytest.mark.parametrize("parents,prefix_lens,max_kv_len,match", [
    ([0, 0, 1], [2], None, "parents\\[0\\] must be -1"),
    ([-1, 0, 2], [2], None, "parents\\[2\\] = 2"),
    ([-1, -1, 0], [2], None, "parents\\[1\\] = -1"),
    ([-1, 0, 1], [2, -1], None, "prefix_lens must be >= 0"),
    ([-1, 0, 1], [2, 4], 6, "max_kv_len = 6 < max\\(prefix_lens\\) \\+ T = 7"),
    ([[-1, 0]], [2], None, "parents must be"),
])
def test_tree_mask_errors(impl, parents, prefix_lens, max_kv_len, match):
    with pytest.raises(ValueError, match=match):
        impl(torch.tensor(parents), torch.tensor(prefix_lens), max_kv_len)


# ---------------------------------------------------------------- no host syncs on a GPU

def test_values_readable_policy(monkeypatch):
    """Values are read where that is free (CPU) or when CHIMERA_KERNELS_CHECK=1 asks for it."""
    values_readable = chimera_kernels._dispatch.values_readable
    cuda_like = SimpleNamespace(is_meta=False, is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.delenv("CHIMERA_KERNELS_CHECK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (a CPU build has no CUDA)
    assert values_readable(torch.zeros(2), None)
    assert not values_readable(torch.zeros(2, device="meta"))
    assert not values_readable(cuda_like)
    monkeypatch.setenv("CHIMERA_KERNELS_CHECK", "1")
    assert values_readable(cuda_like)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not values_readable(cuda_like)  # reading is illegal during CUDA graph capture


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The wrappers' GPU path on CPU tensors: no value may be read (values_readable is False)."""
    for module in (chimera_kernels.trigram, chimera_kernels.tree_mask):
        monkeypatch.setattr(module, "values_readable", lambda *tensors: False)


@pytest.mark.parametrize("name", ["chain", "star", "medusa-like"])
def test_tree_mask_gpu_path(as_on_a_gpu, name):
    """Unread parents: the walk is bounded by T - 1 instead of the depth; same mask."""
    parents, prefix_lens = torch.tensor(TREES[name]), torch.tensor([0, 5, 130])
    max_kv_len = 130 + len(parents)
    assert chimera_kernels.tree_mask._check_inputs(parents, prefix_lens, max_kv_len) == (
        max_kv_len, len(parents) - 1)
    expected = tree_attention_mask_reference(parents, prefix_lens, max_kv_len)
    assert torch.equal(tree_attention_mask_triton(parents, prefix_lens, max_kv_len), expected)


def test_tree_mask_gpu_path_never_reads_out_of_bounds(as_on_a_gpu):
    """Bad parents go unchecked on a GPU; the kernel's walk must still stay inside parents."""
    # Node 2's parent 7 is past the tree; memory there holds 3, which a read would follow.
    memory = torch.tensor([-1, 0, 7, 1, 0, 0, 0, 3], dtype=torch.int32)
    mask = tree_attention_mask_triton(memory[:4], torch.tensor([3]), 8)[0]  # [T, max_kv_len]
    assert mask[:, :3].all()  # the prefix is visible whatever the tree
    assert mask[2, 3:].tolist() == [False, False, True, False, False]  # node 2 sees itself only


def test_trigram_gpu_path(as_on_a_gpu):
    args = make_trigram_inputs([3, 1, 9], d=24, d_out=40, with_prefix=True)
    assert_trigram_close(args, "gelu", torch.float32)


def test_meta_tensors_launch_without_values():
    """The launch is computed from shapes alone: meta tensors (no values) go through."""
    from chimera_kernels.launches import TreeMaskCall, TrigramCall

    launch = TrigramCall("vllm", torch.bfloat16, torch.int32, "silu", 576, 40, True).launch()
    assert launch.grid == (2, 9) and launch.constexprs["BLOCK_M"] == 32
    launch = TreeMaskCall("vllm", 9, 200).launch()
    assert launch.args["max_depth"] == 8 and launch.grid == (2, 1, 1)
    with pytest.raises(RuntimeError, match="item"):  # without max_kv_len the width needs values: the one sync left
        tree_attention_mask_triton(torch.zeros(3, dtype=torch.int32, device="meta"),
                                   torch.zeros(1, dtype=torch.int64, device="meta"))


# ---------------------------------------------------------------- dispatch

@pytest.fixture
def spy(monkeypatch):
    """Replace each implementation with a recorder; returns the list of called names."""
    calls = []
    for module, kernel in ((chimera_kernels.trigram, "trigram_encoder"),
                           (chimera_kernels.tree_mask, "tree_attention_mask")):
        for name in (f"{kernel}_reference", f"{kernel}_triton"):
            monkeypatch.setattr(module, name, lambda *a, _name=name, **k: calls.append(_name))
    return calls


@pytest.mark.parametrize("env,expected", [
    (None, "reference"), ("auto", "reference"), ("reference", "reference"), ("triton", "triton")])
def test_dispatch(spy, monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("CHIMERA_KERNELS", raising=False)
    else:
        monkeypatch.setenv("CHIMERA_KERNELS", env)
    token_ids, cu_seqlens, embed, w1, bias, _ = make_trigram_inputs([3], d=8, d_out=6)
    trigram_encoder(token_ids, cu_seqlens, embed, w1, bias)
    tree_attention_mask(torch.tensor([-1, 0]), torch.tensor([3]))
    assert spy == [f"trigram_encoder_{expected}", f"tree_attention_mask_{expected}"]


def test_dispatch_auto_rule(monkeypatch):
    """'auto': Triton only for CUDA inputs and when autograd does not need to differentiate the call."""
    monkeypatch.delenv("CHIMERA_KERNELS", raising=False)
    monkeypatch.setattr(chimera_kernels._dispatch, "triton_available", lambda: True)
    def cuda_like(requires_grad=False):
        return SimpleNamespace(is_cuda=True, requires_grad=requires_grad)

    use_triton = chimera_kernels._dispatch.use_triton
    assert use_triton(cuda_like(), None, cuda_like())
    assert not use_triton(cuda_like(), torch.zeros(1))  # one CPU tensor
    # Training: the kernels are forward-only, the reference has a backward.
    assert not use_triton(cuda_like(), cuda_like(requires_grad=True))
    with torch.no_grad():
        assert use_triton(cuda_like(), cuda_like(requires_grad=True))


def test_trigram_triton_refuses_grad():
    token_ids, cu_seqlens, embed, w1, bias, _ = make_trigram_inputs([3], d=24, d_out=16)
    w1.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        trigram_encoder_triton(token_ids, cu_seqlens, embed, w1, bias)
    trigram_encoder_reference(token_ids, cu_seqlens, embed, w1, bias).sum().backward()  # the training path
    assert w1.grad is not None and w1.grad.abs().sum() > 0


def test_dispatch_bad_env(monkeypatch):
    monkeypatch.setenv("CHIMERA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="CHIMERA_KERNELS"):
        tree_attention_mask(torch.tensor([-1, 0]), torch.tensor([3]))


def test_dispatch_forced_triton_end_to_end(monkeypatch):
    monkeypatch.setenv("CHIMERA_KERNELS", "triton")
    args = make_trigram_inputs([4, 1], d=24, d_out=24, with_prefix=True)
    torch.testing.assert_close(trigram_encoder(*args[:5], "relu", args[5]),
                               trigram_encoder_reference(*args[:5], "relu", args[5]), atol=1e-5, rtol=1e-5)
    parents, prefix_lens = torch.tensor(TREES["medusa-like"]), torch.tensor([4, 0])
    assert torch.equal(tree_attention_mask(parents, prefix_lens),
                       tree_attention_mask_reference(parents, prefix_lens))


# ---------------------------------------------------------------- environment (fresh interpreters)

def run_python(code, **env):
    """Run `code` in a fresh interpreter with TRITON_INTERPRET removed and `env` added."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, env=full_env, timeout=300)


def test_import_does_not_import_triton():
    run_python("""
        import sys, chimera_kernels
        assert "triton" not in sys.modules, "chimera_kernels imported triton eagerly"
    """)


def test_interpreter_when_triton_was_imported_first():
    """Another module (transformers, via conftest) may import triton before TRITON_INTERPRET=1 is set."""
    run_python("""
        import os, torch, triton
        os.environ["TRITON_INTERPRET"] = "1"
        from chimera_kernels import (tree_attention_mask_reference, tree_attention_mask_triton,
                                     trigram_encoder_reference, trigram_encoder_triton)
        torch.manual_seed(0)
        args = (torch.tensor([3, 1, 4, 1, 5]), torch.tensor([0, 2, 5]), torch.randn(8, 16),
                torch.randn(16, 48), torch.randn(16))
        for act in ("silu", "gelu"):
            torch.testing.assert_close(trigram_encoder_triton(*args, act),
                                       trigram_encoder_reference(*args, act))
        parents, prefix_lens = torch.tensor([-1, 0, 0, 1]), torch.tensor([3, 0])
        assert torch.equal(tree_attention_mask_triton(parents, prefix_lens),
                           tree_attention_mask_reference(parents, prefix_lens))
    """)


# ---------------------------------------------------------------- the prepared GPU check, on the CPU

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_smoke(tmp_path):
    """scripts/gpu_check.sh end to end in its CPU smoke mode (interpreted kernels, --quick), as
    the device tool runs it: the report lands in $OUT and every check ran and passed."""
    env = {k: v for k, v in os.environ.items()} | {"TRITON_INTERPRET": "1", "OUT": str(tmp_path),
                                                   "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--quick"],
                   check=True, env=env, timeout=600, capture_output=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"], [row for row in report["rows"] if not row["ok"]]
    assert {row["check"] for row in report["rows"]} == {"kernel", "host sync", "draft", "tree attention"}
    kernels = {row["case"].split()[0] for row in report["rows"] if row["check"] == "kernel"}
    assert kernels == {"trigram", "tree_mask"}
    assert (tmp_path / "report.md").read_text().startswith("# GPU check on")
    assert (tmp_path / "log.txt").exists()


def test_gpu_check_default_output(monkeypatch):
    """Without --output: $OUT (what the device tool brings back), else results/gpu/<date>/."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("OUT", "/some/where")
    assert gpu_check.default_output() == Path("/some/where")
    monkeypatch.delenv("OUT")
    assert gpu_check.default_output().parent == REPO / "results" / "gpu"
