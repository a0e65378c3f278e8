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
  # NIXL for the P/D KV transfer tests, without the meta package's torch / other-CUDA requirements.
  if ! .venv/bin/python -c "import nixl._api" 2>/dev/null; then
    flavour=$(.venv/bin/python -c "import torch; v = torch.version.cuda; print('cu13' if v and v.startswith('13') else 'cu12')")
    .venv/bin/python -m pip install -q --no-deps numpy nixl==1.5.1 "nixl-$flavour==1.5.1" \
      || echo "bootstrap: NIXL did not install; P/D falls back to the TCP side channel" >&2
  fi
  echo "$want" > "$stamp"
fi
