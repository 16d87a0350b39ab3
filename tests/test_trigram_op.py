"""chimera::trigram_encoder_rows, the trigram encoder as a custom op over per-row windows
(what the compiled draft calls): the packed encoder's result, a valid op, opaque to
torch.compile with the row count as its one dynamic dimension."""
from __future__ import annotations

import pytest
import torch

from chimera_kernels import trigram_encoder, trigram_window_ids
from chimera_kernels.trigram_op import trigram_encoder_rows

VOCAB, D = 64, 32


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, D, generator=g), torch.randn(D, 3 * D, generator=g) / D


def _packed_batch():
    # The worked example of trigram_window_ids, with vocabulary-sized ids.
    token_ids = torch.tensor([10, 11, 12, 20, 30, 31])
    cu_seqlens = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    prefix_ids = torch.tensor([[-1, -1], [5, 6], [-1, 7]])
    return token_ids, cu_seqlens, prefix_ids


@pytest.mark.parametrize("activation", ["silu", "gelu", "identity"])
def test_rows_of_windows_equal_the_packed_encoder(activation):
    embed, w1 = _weights()
    token_ids, cu_seqlens, prefix_ids = _packed_batch()
    expected = trigram_encoder(token_ids, cu_seqlens, embed, w1, None, activation, prefix_ids)
    windows = trigram_window_ids(token_ids, cu_seqlens, prefix_ids)  # [6, 3]
    torch.testing.assert_close(trigram_encoder_rows(windows, embed, w1, activation), expected,
                               rtol=0, atol=0)
    # torch.ops is the same op
    op = torch.ops.chimera.trigram_encoder_rows
    torch.testing.assert_close(op(windows, embed, w1, activation), expected, rtol=0, atol=0)


def test_op_passes_opcheck():
    embed, w1 = _weights()
    windows = torch.randint(0, VOCAB, (5, 3))
    torch.library.opcheck(torch.ops.chimera.trigram_encoder_rows.default,
                          (windows, embed, w1, "silu"),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_caller_is_one_graph_for_every_row_count():
    """fullgraph (no graph break at the op), dynamic rows, no recompilation per size. The
    rows are marked dynamic as vLLM's support_torch_compile marks them (dimension 0 only)."""
    embed, w1 = _weights()
    w2 = torch.randn(D, D)

    def encode(windows):
        return trigram_encoder_rows(windows, embed, w1, "silu") @ w2

    torch._dynamo.reset()
    compiled = torch.compile(encode, fullgraph=True, dynamic=False, backend="eager")
    from torch._dynamo.utils import counters

    counters.clear()
    for num_rows in (5, 7, 2, 16):
        windows = torch.randint(0, VOCAB, (num_rows, 3))
        torch._dynamo.mark_dynamic(windows, 0)
        torch.testing.assert_close(compiled(windows), encode(windows))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_interpreted_triton_kernel_through_the_op(monkeypatch):
    """The op's kernel path (CHIMERA_KERNELS=triton, interpreted on CPU) = the reference."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("CHIMERA_KERNELS", "triton")
    embed, w1 = _weights(1)
    windows = torch.randint(0, VOCAB, (9, 3))
    with torch.no_grad():
        got = trigram_encoder_rows(windows, embed, w1, "silu")
    monkeypatch.setenv("CHIMERA_KERNELS", "reference")
    torch.testing.assert_close(got, trigram_encoder_rows(windows, embed, w1, "silu"),
                               rtol=1e-5, atol=1e-5)
