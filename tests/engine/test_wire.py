"""Engine wire messages: each kind round-trips as its dataclass; bad input is a BadMessage naming the request."""
from __future__ import annotations

import pytest

from wideep.engine import wire
from wideep.engine.api import EngineRequest, EngineStats, RequestOutput, SamplingParams


def test_every_kind_round_trips():
    req = EngineRequest("r1", [1, 2, 3], SamplingParams(max_tokens=4))
    for msg in (wire.Add(req), wire.Abort(["a", "b"]), wire.StatsRequest(), wire.ResetPrefixCache(), wire.Shutdown()):
        back = wire.decode_to_engine(wire.encode(msg))
        assert type(back) is type(msg)
    assert wire.decode_to_engine(wire.encode(wire.Add(req))).request.to_dict() == req.to_dict()
    assert wire.decode_to_engine(wire.encode(wire.Abort(["a"]))).request_ids == ["a"]
    out = RequestOutput.from_dict(RequestOutput("r1", [7], finished=True, finish_reason="length").to_dict())
    stats = EngineStats.from_dict(EngineStats().to_dict())
    for msg in (wire.Ready({"num_blocks": 3}), wire.Outputs([out], stats), wire.Outputs([out]),
                wire.Rejected("r1", "too long", "prompt"), wire.Stats(stats), wire.Fatal("gone")):
        assert wire.decode_from_engine(wire.encode(msg)) == msg


def test_outputs_with_every_field_round_trip_as_plain_maps():
    full = RequestOutput("r2", [5, 6], finished=True, finish_reason="stop", stop_reason=6, num_prompt_tokens=3,
                         num_cached_tokens=2, kv_transfer_params={"remote_block_ids": [1, 2], "remote_port": 9},
                         error=None, logprobs=[[-0.5, 1, [5, 4], [-0.5, -1.0]], [-0.1, 2, [3, 6], [-0.05, -0.1]]],
                         prompt_logprobs=[[-2.0, 4, [], []], [-1.0, 1, [], []]])
    body = wire.unpack(wire.encode(wire.Outputs([full])))
    assert body["outputs"] == [full.to_dict()]
    assert wire.decode_from_engine(wire.encode(wire.Outputs([full]))) == wire.Outputs([full])


def test_the_wire_stays_plain_maps():
    assert wire.unpack(wire.encode(wire.Abort(["x"]))) == {"type": "abort", "request_ids": ["x"]}
    assert wire.unpack(wire.encode(wire.Rejected("r", "m"))) == {"type": "error", "request_id": "r", "message": "m",
                                                                 "param": None}


def test_bad_messages():
    with pytest.raises(wire.BadMessage) as exc:
        wire.decode_to_engine(wire.pack({"type": "add", "request": {"request_id": "r9", "prompt_token_ids": "x"}}))
    assert exc.value.request_id == "r9"
    with pytest.raises(wire.BadMessage, match="unknown engine message type 'bogus'"):
        wire.decode_to_engine(wire.pack({"type": "bogus"}))
    with pytest.raises(wire.BadMessage, match="does not go to the engine"):
        wire.decode_to_engine(wire.encode(wire.Fatal("x")))
