"""Review: numbers JSON can carry but the engine wire (msgpack, int64) cannot are a 400 naming the
field, not a 500 from the engine client's encoder; non-finite floats (Python's json reads NaN and
Infinity) are rejected instead of silently sampling garbage."""
from __future__ import annotations

import pytest

from wideep.engine.api import EngineRequest
from wideep.engine.proc import pack
from wideep.server.errors import APIError
from wideep.server.protocol import parse_chat, parse_completion

HUGE = 2 ** 70


def _completion(**fields):
    return {"model": "tiny", "prompt": "hello", "max_tokens": 3, **fields}


def _chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("field,value", [
    ("seed", HUGE), ("seed", -HUGE), ("top_k", HUGE),
    ("stop_token_ids", [HUGE]), ("prompt", [HUGE]),
])
def test_out_of_int64_numbers_are_400_naming_the_field(field, value):
    with pytest.raises(APIError) as e:
        parse_completion(_completion(**{field: value}))
    assert e.value.status == 400
    assert e.value.param == field


@pytest.mark.parametrize("field", ["seed", "top_k"])
def test_chat_out_of_int64_numbers_are_400(field):
    with pytest.raises(APIError) as e:
        parse_chat(_chat(**{field: HUGE}))
    assert (e.value.status, e.value.param) == (400, field)


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("top_p", float("nan"))])
def test_non_finite_floats_are_400(field, value):
    with pytest.raises(APIError) as e:
        parse_completion(_completion(**{field: value}))
    assert (e.value.status, e.value.param) == (400, field)


def test_largest_accepted_numbers_fit_the_engine_wire():
    """What the parser accepts must be encodable for the engine process (the path that was a 500)."""
    from wideep.engine.api import SamplingParams

    top = 2 ** 63 - 1
    req = parse_completion(_completion(seed=top, top_k=top, stop_token_ids=[top], temperature=HUGE))
    assert req.temperature == float(HUGE)  # a number field: a huge integer is just a large float
    sp = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                        seed=req.seed, stop_token_ids=req.stop_token_ids)
    pack({"type": "add", "request": EngineRequest("r", [1, 2], sp).to_dict()})
