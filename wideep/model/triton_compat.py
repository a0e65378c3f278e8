"""Triton for the model's kernels, or None where it is not installed (the torch references run then).

Without a GPU the kernels can only run under Triton's interpreter, which must be chosen before triton is
first imported (its own library functions are wrapped at import time), so every kernel module imports
triton from here.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the torch references
    triton = None
    tl = None
# a real class (not a string) so both the JIT and the interpreter see kernel parameters as compile-time constants
constexpr = tl.constexpr if tl is not None else "constexpr"

__all__ = ["constexpr", "tl", "triton"]
