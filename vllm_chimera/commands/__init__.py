"""The command lines, one module per console script (argparse lives here and nowhere else):

    chimera-demo     demo.py      the shipped draft against plain vLLM (or toy models)
    chimera-bench    bench.py     every vLLM method side by side (vllm_chimera.harness)
    chimera-prepare  prepare.py   targets and data from PyPI (vllm_chimera.prepare)
    chimera-train    train.py     train a draft (vllm_chimera.training)
    vllm-chimera     serve.py     vLLM's own command line with the plugin loaded

A command imports what it runs; nothing imports a command.
"""
