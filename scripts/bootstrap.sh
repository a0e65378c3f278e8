#!/usr/bin/env bash
# Creates ./.venv (once) and installs wideep into it: the runtime dependencies only, or with
# `--test` the test extras too (pytest, ruff, transformers, openai, envoy, triton ...).
# Re-runs pip only when pyproject.toml or the mode changed. On a machine without nvidia-smi torch
# is the CPU build (torch==2.13.0), which keeps the runtime venv under ~1.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
mode=runtime
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  mode=test
fi
say() { echo "wideep setup: $*"; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.wideep-installed
want="$mode $(sha256sum pyproject.toml | cut -d' ' -f1)"
have=$(cat "$stamp" 2>/dev/null || true)
# a test install covers the runtime one
if [ "$have" = "$want" ] || { [ "$mode" = runtime ] && [ "$have" = "test ${want#runtime }" ]; }; then
  exit 0
fi
start=$SECONDS
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    say "installing torch (CUDA build; the largest download, a few minutes)"
    .venv/bin/python -m pip install -q torch
  else
    say "installing torch 2.13.0 (CPU build; the largest download, about a minute)"
    .venv/bin/python -m pip install -q torch==2.13.0
  fi
fi
if [ "$mode" = test ]; then
  say "installing wideep with its test extras (pytest, ruff, transformers, openai, envoy, triton, matplotlib)"
else
  say "installing wideep and its runtime dependencies (aiohttp, pyzmq, grpcio, tokenizers, ...)"
fi
.venv/bin/python -m pip install -q -e ".$extras"
echo "$want" > "$stamp"
say "done in $((SECONDS - start)) s ($(du -sh .venv 2>/dev/null | cut -f1) in .venv)"
