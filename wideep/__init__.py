"""wideep: wide expert-parallel serving of DeepSeek-class MoE models."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that router/deploy/bench (which never import torch) stay light.
    if name == "LLM":
        from wideep.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from wideep.engine.api import SamplingParams
        return SamplingParams
    raise AttributeError(name)
