#!/usr/bin/env bash
# The README's main job: installs the runtime dependencies, makes the tiny model if absent and runs
# the embedded default stack. The CLI lives in the venv: `.venv/bin/wideep status`, or activate it first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "wideep setup: starting the stack; in another shell run .venv/bin/wideep status (or: source .venv/bin/activate; wideep status)"
exec .venv/bin/wideep up "$@"
