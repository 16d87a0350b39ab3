#!/usr/bin/env bash
# One prepared device check (DEVELOPERS.md "The ground"): on a machine with a CUDA GPU and
# PyTorch + Triton only (no vLLM, no network), every Triton kernel in kernels/ is compiled
# for real, checked against its PyTorch reference and timed against it. The report goes to
# results/gpu/<date>/ (report.md, report.json, and this run's log); commit it.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from anywhere in the repo
#   PYTHON=python3.11 bash scripts/gpu_check.sh
# Exit status 1 if any kernel disagrees with its reference.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
[ -x "$here/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$here/.venv/bin/python"
out="$here/results/gpu/$(date -u +%Y-%m-%d)"
mkdir -p "$out"
# kernels/ is installed as the package chimera_kernels: without installing anything, a
# temporary folder with that name pointing at kernels/ makes it importable.
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
ln -s "$here/kernels" "$shim/chimera_kernels"
{
  echo "# $(date -u +%FT%TZ) $(uname -srm)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
  unset TRITON_INTERPRET
  PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" "$py" "$here/scripts/gpu_check.py" --output "$out" "$@"
} 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
