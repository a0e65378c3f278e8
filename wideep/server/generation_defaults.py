"""`--generation-config`: default sampling parameters from the model's generation_config.json, as vLLM
applies them: a request that omits temperature / top_p / top_k / min_p / repetition_penalty gets the
model creator's value (DeepSeek-R1: temperature 0.6, top_p 0.95), and max_new_tokens caps max_tokens.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("wideep.frontend")

# generation_config.json key -> request field
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_sampling_defaults(setting: str, model_dir: str) -> dict[str, Any]:
    """'vllm': none; 'auto': the model directory's file; else a directory holding generation_config.json."""
    if setting == "vllm":
        return {}
    path = Path(model_dir if setting == "auto" else setting) / "generation_config.json"
    if not path.is_file():
        if setting != "auto":
            raise ValueError(f"--generation-config {setting!r}: {path} does not exist")
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    out = {KEYS[k]: v for k, v in doc.items() if k in KEYS and v is not None}
    if out:
        log.info("default sampling parameters from %s (a request's own values win; --generation-config vllm "
                 "turns this off): %s", path, out)
    return out


def apply_defaults(body: Any, defaults: dict[str, Any]) -> Any:
    """The body with each default filled in where the request omits the field (or sends null).
    max_tokens is not filled here: it is a cap, see `cap_max_tokens`."""
    if not defaults or not isinstance(body, dict):
        return body
    filled = {k: v for k, v in defaults.items() if k != "max_tokens" and body.get(k) is None}
    return {**body, **filled} if filled else body


def cap_max_tokens(max_tokens: int | None, defaults: dict[str, Any]) -> int | None:
    cap = defaults.get("max_tokens")
    if cap is None:
        return max_tokens
    return cap if max_tokens is None else min(max_tokens, cap)
