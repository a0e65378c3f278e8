#!/usr/bin/env bash
# The README's main job: installs what it needs, makes the tiny model if absent and runs the embedded default stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/wideep up "$@"
