"""Sequential heads (config.sequential_heads, Hydra's lesson): head i also reads the
embedding of the token before its own target. Training, the reference decoder and the
checkpoint round trip, and vLLM serving them as the reference decoder does."""
from __future__ import annotations

import pytest
import torch

from vllm_chimera.reference import ChimeraDrafter, SpeculativeDecoder, generate_plain
from vllm_chimera.training.loss import DraftLoss, previous_tokens
from vllm_chimera.tree import TokenTree

from conftest import build_random_draft
from test_training import settings_for, tiny_setup  # noqa: F401 (fixture)


def _state(target, draft, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.config.vocab_size, (length,), generator=g)
    with torch.no_grad():
        hidden = target.base_model(input_ids=ids[None]).last_hidden_state[0]  # [L, d]
        s = draft.encode(ids[1:][None], hidden[:-1][None], torch.arange(length - 1)[None],
                         torch.tensor([[-1, int(ids[0])]]))[0]  # [L-1, d]
    return ids, hidden[:-1], s


def test_previous_tokens_are_the_token_before_each_heads_target():
    """Head i at t predicts greedy[t+1+i] (x_{t+2+i}); it reads x_{t+1} (head 0) or head
    i-1's label greedy[t+i]."""
    tokens = torch.arange(10, 15)[None]  # [1, 5]
    greedy = torch.arange(20, 25)[None]
    previous = previous_tokens(tokens, greedy, num_heads=4)  # [4, 1, 4]
    assert previous.shape == (4, 1, 4)
    assert previous[:, 0, 2].tolist() == [13, 23, 24, 24]  # t = 2 (the docstring's example)
    assert previous[:, 0, 0].tolist() == [11, 21, 22, 23]
    assert previous[0, 0].tolist() == [11, 12, 13, 14]


def test_zero_token_weights_give_the_parallel_heads(tiny_target):
    parallel = build_random_draft(tiny_target, num_heads=3)
    sequential = build_random_draft(tiny_target, num_heads=3, sequential_heads=True)
    missing = sequential.load_state_dict(parallel.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"heads.{i}.token_up.weight" for i in range(3)]
    for head in sequential.heads:
        torch.nn.init.zeros_(head.token_up.weight)
    ids, h, s = _state(tiny_target, parallel)
    previous = torch.randint(0, 128, (3, h.shape[0]))
    torch.testing.assert_close(sequential.head_logits(h, s, previous), parallel.head_logits(h, s))
    with pytest.raises(ValueError, match="previous_token_ids"):
        sequential.head_logits(h, s)
    with pytest.raises(ValueError, match="previous_token_ids"):
        parallel.head_logits(h, s, previous)


def test_propose_feeds_each_head_the_top_token_of_the_one_before(tiny_target):
    draft = build_random_draft(tiny_target, num_heads=3, sequential_heads=True)
    ids, h, s = _state(tiny_target, draft)
    x_next = ids[1:]  # [L-1]: x_{t+1}
    with torch.no_grad():
        proposal = draft.propose(h, s, top_k=2, next_token_ids=x_next)  # [K, L-1, 2]
        chain = torch.stack([x_next] + [proposal[i, :, 0] for i in range(2)])  # [K, L-1]
        logits = draft.head_logits(h, s, chain)  # [K, L-1, V]
    assert torch.equal(proposal, logits.topk(2, dim=-1).indices)
    # The feeding matters: another chain gives other tokens somewhere.
    with torch.no_grad():
        other = draft.head_logits(h, s, (chain + 1) % 128).argmax(-1)
    assert not torch.equal(other[1:], proposal[1:, :, 0])
    with pytest.raises(ValueError, match="next_token_ids"):
        draft.propose(h, s)
    # The reference decoder's drafter feeds head 0 the newest token, x_{n+1}.
    assert torch.equal(ChimeraDrafter(draft).propose(ids, h, 2), proposal[:, -1])


@pytest.mark.parametrize("tree", [TokenTree.chain(3), TokenTree.from_paths(
    [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])], ids=["chain", "tree"])
def test_greedy_with_sequential_heads_equals_plain(tiny_target, prompts, tree):
    draft = build_random_draft(tiny_target, num_heads=3, sequential_heads=True)
    decoder = SpeculativeDecoder(tiny_target, ChimeraDrafter(draft), tree)
    for prompt in prompts:
        assert decoder.generate(prompt, 30).token_ids == generate_plain(tiny_target, prompt, 30).token_ids


def test_the_training_loss_reads_the_teacher_forced_tokens(tiny_target, monkeypatch):
    draft = build_random_draft(tiny_target, num_heads=2, sequential_heads=True)
    loss = DraftLoss(draft, head_weights=[1.0, 1.0])
    ids, h, s = _state(tiny_target, draft, length=6)
    tokens, greedy = ids[None], torch.randint(0, 128, (1, 6))
    hidden = torch.cat([h, torch.randn(1, h.shape[-1])])[None]  # [1, L, d]
    selected = torch.tensor([[False, True, False, True, False]])
    seen = {}
    original = draft.head_states

    def spy(hs, ss, previous=None):
        seen["previous"] = previous
        return original(hs, ss, previous)

    monkeypatch.setattr(draft, "head_states", spy)
    loss.head_states(tokens, hidden, selected, greedy)
    assert seen["previous"].tolist() == [[int(ids[2]), int(ids[4])], [int(greedy[0, 2]), int(greedy[0, 4])]]


def test_a_sequential_draft_trains_resumes_and_round_trips(tiny_setup, tmp_path):  # noqa: F811
    from vllm_chimera.checkpoint import load_draft
    from vllm_chimera.training import train

    common = dict(epochs=2, save_every=3, draft_overrides={"sequential_heads": True})
    whole = train(settings_for(tiny_setup, tmp_path / "whole", **common))
    train(settings_for(tiny_setup, tmp_path / "part", stop_at_step=5, **common))
    resumed = train(settings_for(tiny_setup, tmp_path / "part", **common))
    assert whole["finished"] and resumed["validation"] == whole["validation"]
    a, b = load_draft(tmp_path / "whole" / "draft"), load_draft(tmp_path / "part" / "draft")
    assert a.config.sequential_heads is True
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert any(head.token_up.weight.abs().sum() > 0 for head in a.heads)


def test_the_cli_flag_is_for_chimera_only(tiny_setup, tmp_path, capsys):  # noqa: F811
    from vllm_chimera.commands.train import settings_from_args, train_parser

    parser = train_parser()
    argv = ["--target", tiny_setup["target"], "--train-data", tiny_setup["train"],
            "--val-data", "none", "--output-dir", str(tmp_path), "--sequential-heads"]
    assert settings_from_args(parser.parse_args(argv), parser).draft_overrides == {"sequential_heads": True}
    with pytest.raises(SystemExit):
        settings_from_args(parser.parse_args(argv + ["--draft-kind", "medusa"]), parser)
    assert "sequential_heads" in capsys.readouterr().err


@pytest.mark.parametrize("tree", [None, [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]]])
def test_vllm_serves_sequential_heads_as_the_reference_does(tmp_path, tree):
    """Heads that know the target only through the token before their target: inside vLLM
    they are right (and accepted) only if each is fed the head before it, and the accepted
    count equals the reference decoder's, chain and tree; output = plain."""
    pytest.importorskip("vllm")
    import vllm_utils  # noqa: F401  (sets VLLM_ENABLE_V1_MULTIPROCESSING before vLLM loads)
    from vllm import SamplingParams

    from vllm_chimera.checkpoint import save_draft
    from vllm_chimera.toy import build_permutation_pair
    from vllm_utils import run_engine

    target, draft, _ = build_permutation_pair(tmp_path, num_heads=4, num_wrong=32, sequential=True)
    save_draft(draft, tmp_path / "draft")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 3, 7, 12, 20, 5)]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = run_engine(tmp_path / "target", prompts, greedy)
    spec = run_engine(tmp_path / "target", prompts, greedy, tmp_path / "draft", tree=tree)
    assert spec.token_ids == plain.token_ids
    chain = TokenTree.chain(4) if tree is None else TokenTree.from_paths(tree)
    decoder = SpeculativeDecoder(target, ChimeraDrafter(draft), chain)
    reference_accepted = sum(sum(n - 1 for n in decoder.generate(torch.tensor(p), 40).accept_lengths)
                             for p in prompts)
    assert reference_accepted > 2 * len(prompts) * 40 * 0.25  # the chained heads are mostly right
    assert spec.counter("vllm:spec_decode_num_accepted_tokens") == reference_accepted


def test_a_parallel_draft_continues_as_a_sequential_one(tiny_setup, tmp_path):  # noqa: F811
    """init_from a parallel draft with sequential_heads: token_up starts at zero, so the run
    starts from exactly the saved draft's predictions (lr 0: the same validation), and with
    learning the token weights move."""
    from vllm_chimera.checkpoint import load_draft
    from vllm_chimera.training import train

    first = train(settings_for(tiny_setup, tmp_path / "parallel", epochs=1))
    init = str(tmp_path / "parallel" / "draft")
    same = train(settings_for(tiny_setup, tmp_path / "same", epochs=1, lr=0.0, init_from=init,
                              draft_overrides={"sequential_heads": True}))
    assert same["validation"]["head_accuracy"] == first["validation"]["head_accuracy"]
    saved, continued = load_draft(init).state_dict(), load_draft(tmp_path / "same" / "draft").state_dict()
    for name, weight in continued.items():
        want = torch.zeros_like(weight) if ".token_up." in name else saved[name]
        assert torch.equal(weight, want), name
    train(settings_for(tiny_setup, tmp_path / "seq", epochs=1, init_from=init,
                       draft_overrides={"sequential_heads": True}))
    draft = load_draft(tmp_path / "seq" / "draft")
    assert draft.config.sequential_heads and all(head.token_up.weight.abs().sum() > 0
                                                 for head in draft.heads)
    with pytest.raises(ValueError, match="not the draft these settings build: num_decoding_heads"):
        train(settings_for(tiny_setup, tmp_path / "k2", epochs=1, num_heads=2, init_from=init,
                           draft_overrides={"sequential_heads": True}))  # checked before upgrading
    with pytest.raises(ValueError, match="sequential_heads True"):  # not the other way round
        train(settings_for(tiny_setup, tmp_path / "back", epochs=1,
                           init_from=str(tmp_path / "seq" / "draft")))
