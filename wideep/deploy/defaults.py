"""The embedded default spec (a copy of examples/tiny-cpu.yaml shipped inside the package)."""
from __future__ import annotations

from pathlib import Path


def default_spec_path() -> Path:
    return Path(__file__).with_name("default_spec.yaml")
