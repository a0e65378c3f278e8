#!/usr/bin/env bash
# Installs the real inference-perf 0.7.0 into its own venv (default .venv-bench) for cross-checking
# wideep's benchmark. PyPI marks it Requires-Python >=3.12 but it runs on 3.11, so:
#   1. install its dependencies normally (a plain --ignore-requires-python install would pull a
#      numpy sdist that needs 3.12), then
#   2. install the inference-perf wheel itself with --no-deps --ignore-requires-python.
# Idempotent: does nothing when that venv already has inference-perf 0.7.0.
# The wheel is kept in $WIDEEP_WHEEL_CACHE (default .whl/) so a rebuild needs no index for it.
# Run it with HF_HUB_OFFLINE=1 and a local tokenizer directory: no network at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-bench}
VERSION=0.7.0
PY=${PYTHON:-python3}
WHEELS=${WIDEEP_WHEEL_CACHE:-.whl}

installed() {
  [ -x "$VENV/bin/inference-perf" ] &&
    [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("inference-perf"))' 2>/dev/null)" = "$VERSION" ]
}

if installed; then
  echo "inference-perf $VERSION already in $VENV"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
quiet "${PIP[@]}" aiohttp pydantic numpy datasets transformers==5.13.0 jinja2 google-cloud-storage pyyaml \
  boto3 uvloop tqdm aiofiles tiktoken rich av pillow prometheus-client matplotlib
mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/inference_perf-$VERSION-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  quiet "$VENV/bin/python" -m pip download -q --no-deps --ignore-requires-python -d "$WHEELS" "inference-perf==$VERSION"
  wheel=$(ls "$WHEELS"/inference_perf-$VERSION-*.whl | head -n1)
fi
quiet "${PIP[@]}" --no-deps --ignore-requires-python "$wheel"
installed || { echo "inference-perf $VERSION did not install into $VENV" >&2; exit 1; }
echo "inference-perf $VERSION installed in $VENV"
