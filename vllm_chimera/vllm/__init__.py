"""The vLLM glue: the only part of vllm-chimera that imports vLLM.

plugin.py       the `vllm.general_plugins` entry point (version check, registrations, patches)
patches.py      every change to vLLM classes, declaratively (mechanism: patching.py)
spec_config.py  Chimera's speculative_config settings: detection, draft discovery, checks
model.py        the draft built from vLLM layers (its encoder layers have paged KV)
proposer.py     the ChimeraProposer the model runner calls each step
"""
