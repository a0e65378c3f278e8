#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
echo "ruff check (lint: pyproject.toml [tool.ruff])"
.venv/bin/python -m ruff check .
echo "mypy (type check: pyproject.toml [tool.mypy] files)"
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q "$@"
