"""The launcher reads a supervisor's /health body: a rank whose process exited ends the group's watch
at once, while a rank that is only unhealthy (a stall, a slow answer) still needs the failed probes."""
import json

from wideep.deploy.launcher import _exited_rank


def _body(rank0: dict) -> bytes:
    return json.dumps({"status": "unavailable", "ranks": {"0": rank0, "1": {"ok": True, "port": 2}},
                       "down": ["0"]}).encode()


def test_an_exited_rank_is_named():
    body = _body({"ok": False, "port": 1, "exited": True, "reason": "engine killed by SIGKILL"})
    assert _exited_rank(body) == "dp rank 0: engine killed by SIGKILL"


def test_a_stalled_or_unreachable_rank_is_not_an_exit():
    assert _exited_rank(_body({"ok": False, "port": 1, "reason": "engine of dp rank 0 made no progress"})) == ""
    assert _exited_rank(_body({"ok": False, "port": 1, "reason": "/health unreachable (TimeoutError)"})) == ""
    assert _exited_rank(b"not json") == "" and _exited_rank(b"[]") == ""
