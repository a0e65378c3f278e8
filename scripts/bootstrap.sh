#!/usr/bin/env bash
# Creates ./.venv (once) and installs wideep with its test extras into it; re-runs pip only when
# pyproject.toml changed. CPU torch comes from the pinned local wheel (pip install torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.wideep-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      .venv/bin/python -m pip install -q torch
    else
      .venv/bin/python -m pip install -q torch==2.13.0
    fi
  fi
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
