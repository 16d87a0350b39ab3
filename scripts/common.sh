# Sourced by the scripts in this folder: where the repository, its Python and the caches are.
# PYTHON, CHIMERA_CACHE_DIR and CHIMERA_RUNS_DIR override the defaults (a benchmark run from
# a clean worktree uses PYTHON=/path/to/main/.venv/bin/python).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
cache="${CHIMERA_CACHE_DIR:-$HOME/.cache/vllm-chimera}"
runs="${CHIMERA_RUNS_DIR:-$cache/runs}"
