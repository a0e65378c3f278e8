"""Locates (installing once if needed) the real inference-perf, wideep's external cross-check.

It lives in its own venv because it pins transformers and wants Python >= 3.12 on paper;
scripts/install_inference_perf.sh knows how to install it on 3.11.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_inference_perf.sh"
DEFAULT_VENV = REPO_ROOT / ".venv-bench"


class InferencePerfUnavailable(RuntimeError):
    """The install script failed (for example: no package index reachable and no cached wheel)."""


@functools.lru_cache(maxsize=None)
def ensure_inference_perf(venv: str | os.PathLike | None = None, timeout: float = 1800.0) -> Path:
    """Path to the `inference-perf` executable; runs the install script at most once per process.

    The venv defaults to $WIDEEP_INFERENCE_PERF_VENV or <repo>/.venv-bench.
    """
    venv_dir = Path(venv or os.environ.get("WIDEEP_INFERENCE_PERF_VENV") or DEFAULT_VENV)
    exe = venv_dir / "bin" / "inference-perf"
    proc = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), str(venv_dir)],
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0 or not exe.exists():
        raise InferencePerfUnavailable(
            f"installing inference-perf into {venv_dir} failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return exe
