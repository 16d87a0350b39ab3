#!/usr/bin/env bash
# The prepared device check (scripts/gpu_check.py): on a machine with a CUDA GPU and PyTorch,
# Triton and transformers only (no vLLM, no network), the kernels on vLLM's launches, the
# wrappers' host syncs, the draft's forward and the paged tree attention, against CPU
# references, in a few minutes. The report (report.md, report.json, log.txt) goes to $OUT
# when set (the folder the device tool brings back), else results/gpu/<date>/; commit it
# under results/gpu/.
#
#   bash scripts/gpu_check.sh                      # on the GPU machine, from anywhere in the repo
#   bash scripts/gpu_check.sh --full               # every compiled kernel (~10 min: over one device call)
#   TRITON_INTERPRET=1 bash scripts/gpu_check.sh --device cpu --quick   # smoke test on a CPU
#   PYTHON=python3.12 bash scripts/gpu_check.sh
# Exit status 1 if any check fails.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
[ -x "$here/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$here/.venv/bin/python"
out="${OUT:-$here/results/gpu/$(date -u +%Y-%m-%d)}"
mkdir -p "$out"
# kernels/ is installed as the package chimera_kernels: without installing anything, a
# temporary folder with that name pointing at kernels/ makes it importable; the repository
# root makes vllm_chimera importable (its torch-only modules: the draft, the tree attention).
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
ln -s "$here/kernels" "$shim/chimera_kernels"
# A GPU run must compile the kernels: a stray TRITON_INTERPRET=1 would interpret them.
case " $* " in *" --device cpu "*) ;; *) unset TRITON_INTERPRET ;; esac
{
  echo "# $(date -u +%FT%TZ) $(uname -srm)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
  PYTHONPATH="$shim:$here${PYTHONPATH:+:$PYTHONPATH}" "$py" "$here/scripts/gpu_check.py" --output "$out" "$@"
} 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
