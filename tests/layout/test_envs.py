"""wideep.envs: one table of environment variables, read when accessed, checked when parsed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import wideep
from wideep import envs
from wideep.errors import ConfigError

ROOT = Path(wideep.__file__).parent
# reading arbitrary names is the point of these two: envsubst of workload files, saving a child's env
ALLOWED = {"wideep/bench/config.py", "wideep/engine/client.py", "wideep/envs.py"}


def test_values_are_read_when_accessed(monkeypatch):
    monkeypatch.delenv("WIDEEP_DIST_TIMEOUT_S", raising=False)
    assert envs.WIDEEP_DIST_TIMEOUT_S == 120.0
    monkeypatch.setenv("WIDEEP_DIST_TIMEOUT_S", "7.5")
    assert envs.WIDEEP_DIST_TIMEOUT_S == 7.5
    monkeypatch.setenv("WIDEEP_KV_SIDE_CHANNEL_PORT", "x")
    with pytest.raises(ConfigError, match=r"^\$WIDEEP_KV_SIDE_CHANNEL_PORT: must be int, got 'x'$"):
        envs.WIDEEP_KV_SIDE_CHANNEL_PORT
    with pytest.raises(AttributeError):
        envs.NOT_A_VARIABLE
    assert all(desc for _, desc in envs.VARIABLES.values())


def test_no_module_reads_the_environment_on_its_own():
    pattern = re.compile(r"os\.(environ\.get|getenv)\(|os\.environ\[")
    readers = {str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py") if pattern.search(p.read_text())}
    assert readers <= ALLOWED, sorted(readers - ALLOWED)
