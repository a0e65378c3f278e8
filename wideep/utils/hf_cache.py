"""A hub id (`deepseek-ai/DeepSeek-R1-0528`) -> its snapshot directory in the local Hugging Face cache.

Offline only: nothing is downloaded (pods get weights from a volume or a prior download). The cache
layout is huggingface_hub's: <cache>/models--ORG--NAME/{refs/REV, snapshots/<commit>/...}, where
<cache> is $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
~/.cache/huggingface/hub.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from wideep import envs

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hub_cache_dir() -> Path:
    if envs.HF_HUB_CACHE:
        return Path(envs.HF_HUB_CACHE).expanduser()
    if envs.HF_HOME:
        return Path(envs.HF_HOME).expanduser() / "hub"
    xdg = envs.XDG_CACHE_HOME or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def resolve_model(model: str, revision: str = "main") -> str:
    """An existing directory as is (absolute); a hub id as its cached snapshot; else ValueError naming
    where it looked."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    if not _HUB_ID.match(model):
        raise ValueError(f"model {model!r} is not a directory (and not a hub id like org/name)")
    cache = hub_cache_dir()
    repo = cache / ("models--" + model.replace("/", "--"))
    where = f"{repo} (cache {cache}; HF_HUB_CACHE={envs.HF_HUB_CACHE or ''!r}, HF_HOME={envs.HF_HOME or ''!r})"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        raise ValueError(f"model {model!r} is not a directory and is not in the local Hugging Face cache: looked in "
                         f"{where}. Download it first (huggingface-cli download {model}) or pass its directory.")
    ref = repo / "refs" / revision
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return str(snap)
    if (snapshots / revision).is_dir():   # a commit hash given as the revision
        return str(snapshots / revision)
    candidates = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(candidates) != 1:
        raise ValueError(f"model {model!r}: {ref} does not name a snapshot and {snapshots} holds "
                         f"{len(candidates)} snapshots; pass the snapshot directory")
    return str(candidates[0])
