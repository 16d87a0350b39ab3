"""Offline batch generation with Chimera: `LLM(..., speculative_config={"method": "chimera"})`.

    python examples/offline_chimera.py TARGET_DIR DRAFT_DIR [--num-tokens K] [--max-tokens N]

Runs the prompts with plain decoding and with Chimera in the same process and prints the
answers, tokens/s of both, the speedup and the mean acceptance length. On CPU it sets the
in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) and a fixed KV-cache size.
"""
import argparse
import os

PROMPTS = [
    "Write a haiku about speculative decoding.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is the capital of France? Answer in one word.",
]

if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("draft")
    parser.add_argument("--num-tokens", type=int, default=None, help="K (default: all heads)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_chimera.harness.offline import compare

    # Instruction-tuned targets answer the prompt as a chat turn.
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    runs = compare(args.target, args.draft, chats, params, args.num_tokens)
    for prompt, text in zip(PROMPTS, runs["chimera"].texts):
        print(f"### {prompt}\n{text.strip()}\n")
    plain, chimera = runs["plain"], runs["chimera"]
    print(f"identical to plain decoding: {plain.token_ids == chimera.token_ids}")
    print(f"plain {plain.tokens_per_second:.1f} tok/s | chimera {chimera.tokens_per_second:.1f} tok/s"
          f" | speedup {chimera.tokens_per_second / plain.tokens_per_second:.2f}x"
          f" | mean acceptance length {chimera.mean_acceptance_length:.2f}")
