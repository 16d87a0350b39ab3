"""The vLLM glue: the only part of vllm-chimera that imports vLLM.

plugin.py    the `vllm.general_plugins` entry point (version check, registrations, patches)
patches.py   every change to vLLM classes, declaratively (mechanism: patching.py)
speculative.py  Chimera detection, draft discovery and checks at configuration time
model.py     the draft built from vLLM layers (its encoder layers have paged KV)
proposer.py  the ChimeraProposer the model runner calls each step
"""
