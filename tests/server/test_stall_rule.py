"""The frontend's stall rule on its own: silence (a frozen engine process) and one step running too
long (e.g. a collective waiting for a frozen peer) both make the rank unhealthy, naming it."""
from __future__ import annotations

from dataclasses import dataclass

from wideep.server.metrics import FrontendMetrics
from wideep.server.state import FrontendState


@dataclass
class Beats:
    silent: float = 0.0
    step: float = 0.0

    def silent_for(self) -> float:
        return self.silent

    def step_running_for(self) -> float:
        return self.step


def _state(client) -> FrontendState:
    return FrontendState(client=client, tokenizer=None, output_processor=None, metrics=FrontendMetrics("m", 3),
                         served_model_names=["m"], model_root="m", dp_rank=3, max_model_len=16, vocab_size=8,
                         stall_timeout_s=5.0, step_timeout_s=60.0)


def test_silence_and_long_steps_are_stalls():
    beats = Beats()
    st = _state(beats)
    st.inflight.update({"a", "b"})
    assert st.stalled() is None
    beats.step = 59.0                   # a long step (a kernel compile) is not yet a stall
    assert st.stalled() is None
    beats.step = 61.0
    assert "dp rank 3 made no progress for 61.0 s: one step still running (2 requests" in st.stalled()
    beats.step, beats.silent = 0.0, 6.0
    assert "dp rank 3 made no progress for 6.0 s: no heartbeat" in st.stalled()
    st.engine_dead_reason = "engine process 7 killed by SIGKILL"   # dead is reported as dead, not as stalled
    assert st.stalled() is None
