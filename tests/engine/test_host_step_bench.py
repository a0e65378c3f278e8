"""benchmarks/host_step.py at a small size on the CPU: the engine loop's host pieces are timed and reported,
synchronous and with async scheduling, and every request's blocks come back (no timing asserted)."""
from __future__ import annotations

import json

import pytest

@pytest.mark.parametrize("extra", [[], ["--async-scheduling"], ["--forward"], ["--eager"], ["--eager", "--forward"]])
def test_host_step_smoke(host_step, tmp_path, extra):
    out = tmp_path / "h.json"
    res = host_step.main(["--batch", "5", "--ctx", "40", "--block-size", "16", "--steps", "4", "--warmup", "2",
                          "--json", str(out)] + extra)
    assert set(host_step.PIECES) <= set(res) and res["host_total"] > 0
    assert json.loads(out.read_text())["argv"][-1] == (extra[-1] if extra else str(out))
