"""Toy targets and drafts built in a folder, for tests and demos (no download needed).

build_tiny_target      a random tiny Llama (tied embeddings, like SmolLM2), or a Qwen2
                       (attention biases, tied or untied LM head, like Qwen2.5)
build_random_draft     a Chimera draft with random weights everywhere (mostly rejected)
build_vllm_target      a tiny Llama (or Qwen2) vLLM's CPU attention accepts (head_dim 32), with a tokenizer
build_permutation_pair a target that follows a permutation and a draft that knows it
                       (mostly accepted): the accept path, end to end
"""
from __future__ import annotations

import torch

from vllm_chimera.config import ChimeraConfig
from vllm_chimera.model import ChimeraDraftModel


# The architectures build_tiny_target makes, by model_type.
TINY_TARGET_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def build_tiny_target(folder, vocab_size=128, hidden_size=64, num_layers=2, seed=0,
                      initializer_range=0.3, model_type="llama", tie_word_embeddings=True):
    """Save a random tiny Llama (tied embeddings, like SmolLM2) or Qwen2 to `folder` and
    load it back.

    initializer_range=0.3 gives varied greedy outputs; at 0.02 a random model repeats one
    token forever, which would make every draft look right and the tests toothless.
    model_type="qwen2": Qwen2's q/k/v projections have biases, which Hugging Face starts
    at zero; they are drawn at random here, so that a path that drops them shows.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_TARGET_ARCHITECTURES:
        raise ValueError(f"model_type must be one of {sorted(TINY_TARGET_ARCHITECTURES)}, "
                         f"got {model_type!r}")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range, architectures=[TINY_TARGET_ARCHITECTURES[model_type]])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    torch.nn.init.normal_(proj.bias, std=initializer_range)
    model.save_pretrained(folder)
    target = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  attn_implementation="sdpa")
    return target.eval()


def build_random_draft(target, num_heads=4, seed=1, **overrides) -> ChimeraDraftModel:
    """A draft with random weights everywhere (heads too, so it is not the target's echo)."""
    torch.manual_seed(seed)
    config = ChimeraConfig.for_target(target.config, num_decoding_heads=num_heads,
                                      initializer_range=0.1, **overrides)
    draft = ChimeraDraftModel(config)
    for head in draft.heads:
        torch.nn.init.normal_(head.down.weight, std=0.1)
    return draft.bind_target(target.get_input_embeddings().weight,
                             target.get_output_embeddings().weight).eval()


def save_word_tokenizer(folder, vocab_size: int) -> None:
    """A word-level tokenizer "t0 t1 ..." <-> ids 0 1 ..., so servers can take text prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token=f"t{vocab_size - 1}",
                            bos_token="t0").save_pretrained(folder)


def build_vllm_target(folder, vocab_size=256, seed=0, model_type="llama", tie_word_embeddings=True):
    """A tiny random Llama (or Qwen2) that vLLM's CPU attention accepts (head_dim 32), with a
    tokenizer."""
    target = build_tiny_target(folder, vocab_size=vocab_size, hidden_size=128, seed=seed,
                               model_type=model_type, tie_word_embeddings=tie_word_embeddings)
    save_word_tokenizer(folder, vocab_size)
    return target


def build_permutation_pair(folder, num_heads=4, num_wrong=0, seed=0, logit_scale=1.0,
                           sequential=False):
    """A target whose greedy next token is a fixed random permutation pi of the current
    token, and a Chimera draft whose heads know pi: head i proposes pi^(i+2)(x_n), which is
    exactly what the target will produce, so its drafts are accepted (except for the
    `num_wrong` tokens x for which the heads are deliberately wrong).

    Target: V = d = 128, embeddings = scaled identity, every layer's o_proj and down_proj
    zero (the residual stream stays E[x_t]), so h_t = sqrt(d) e_{x_t}; the untied LM head's
    row y is e_{pi^-1(y)}, so argmax logits = pi(x_t).
    Draft head i: up reads h only, up = alpha * P_i / sqrt(d) with P_i e_x = e_{pi^(i+1)(x)},
    down = identity, so h + R_i ~ sqrt(d) e_x + alpha' e_{pi^(i+1)(x)} and the LM head's
    argmax is pi(pi^(i+1)(x)) = pi^(i+2)(x).
    `logit_scale` < 1 flattens the target's distribution for sampling tests (greedy and
    the draft are unchanged): with 0.34, p(pi(x)) is about 1/2 at temperature 0.8.
    `sequential`: sequential heads that know pi only through the token before their target
    (up = 0, token_up = 80 I, so R_i = 40 e_{y_i} and the argmax is pi(y_i)): their drafts
    are right only if each head is fed the draft of the head before it (y_0 = x_{n+1}).
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    d = vocab = 128
    g = torch.Generator().manual_seed(seed)
    pi = torch.randperm(vocab, generator=g)
    config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        target.model.embed_tokens.weight.copy_(torch.eye(vocab) * 0.5)
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        target.lm_head.weight.zero_()
        target.lm_head.weight[pi, torch.arange(vocab)] = logit_scale  # row pi(x) = e_x
    target.save_pretrained(folder / "target")
    save_word_tokenizer(folder / "target", vocab)
    target = AutoModelForCausalLM.from_pretrained(folder / "target", dtype=torch.float32).eval()

    draft = build_random_draft(target, num_heads=num_heads, seed=seed,
                               head_intermediate_size=d, sequential_heads=sequential)
    power = pi.clone()  # pi^(i+1), starting at pi^1
    wrong = torch.randperm(vocab, generator=g)[:num_wrong]
    with torch.no_grad():
        for head in draft.heads:
            if sequential:  # E(y) = 0.5 e_y -> token_up: 40 e_y (40 e_{wrong neighbour})
                token = torch.eye(d)
                token[:, wrong] = token[:, wrong].roll(1, dims=0)
                head.up.weight.zero_()
                head.token_up.weight.copy_(80.0 * token)
                head.down.weight.copy_(torch.eye(d))
                continue
            P = torch.zeros(d, d)
            P[power, torch.arange(d)] = 1.0  # P e_x = e_{pi^(i+1)(x)}
            P[:, wrong] = P[:, wrong].roll(1, dims=0)  # deliberately wrong for these x
            head.up.weight.zero_()
            head.up.weight[:, :d] = 40.0 * P / d ** 0.5
            head.down.weight.copy_(torch.eye(d))
            power = pi[power]
    return target, draft, pi
