"""Shared fixtures: the tiny DeepSeek-V3 checkpoint is made once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real HF-format tiny DeepSeek-V3 checkpoint (config.json, safetensors, tokenizer)."""
    from wideep.model.make_model import make_model

    out = tmp_path_factory.mktemp("tiny-model")
    make_model("tiny", out)
    return out


def pytest_collection_modifyitems(config, items):
    if os.environ.get("WIDEEP_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set WIDEEP_SLOW_TESTS=1 (a faster sibling runs by default)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_byte_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with a byte-level BPE tokenizer (grammar-constrained decoding needs one)."""
    from wideep.model.make_byte_tokenizer import write_byte_level_tokenizer

    out = tmp_path_factory.mktemp("tiny-byte-model")
    for f in tiny_model_dir.iterdir():
        (out / f.name).symlink_to(f) if f.suffix == ".safetensors" else (out / f.name).write_bytes(f.read_bytes())
    write_byte_level_tokenizer(out, 4096)
    return out
