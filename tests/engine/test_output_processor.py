"""Output processor: streamed deltas add up to the final text; a stop string spanning tokens never leaks."""
from __future__ import annotations

import pytest

from wideep.engine.api import RequestOutput, SamplingParams
from wideep.engine.output_processor import OutputProcessor


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from wideep.model.tokenizer import load_tokenizer
    return load_tokenizer(tiny_model_dir)


def stream(proc: OutputProcessor, rid: str, token_ids: list[int], finish_at_end: bool = True):
    outs = []
    for i, t in enumerate(token_ids):
        last = finish_at_end and i == len(token_ids) - 1
        o = proc.process(RequestOutput(rid, [t], finished=last, finish_reason="length" if last else None))
        if o is not None:
            outs.append(o)
    return outs


def test_deltas_add_up_without_stop(tokenizer):
    prompt = tokenizer.encode("alpha beta")
    gen = tokenizer.encode("gamma delta epsilon zeta", add_special_tokens=False)
    proc = OutputProcessor(tokenizer)
    proc.add_request("a", prompt, SamplingParams())
    outs = stream(proc, "a", gen)
    text = "".join(o.text for o in outs)
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert text == outs[-1].full_text
    assert tokenizer.decode(prompt) + text == tokenizer.decode(prompt + gen)
    assert proc.take_aborts() == []


def test_stop_string_spanning_tokens_is_held_back_and_cut(tokenizer):
    prompt = tokenizer.encode("alpha")
    gen = tokenizer.encode("one two three four five six", add_special_tokens=False)
    full = tokenizer.decode(prompt + gen)[len(tokenizer.decode(prompt)):]
    stop = "three fo"                                 # spans tokens, ends mid-word
    proc = OutputProcessor(tokenizer)
    proc.add_request("s", prompt, SamplingParams(stop=[stop]))
    outs = stream(proc, "s", gen, finish_at_end=False)
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    streamed = "".join(o.text for o in outs)
    assert streamed == full[:full.index(stop)]
    assert all("thr" not in o.text for o in outs)     # the stop string's start was never streamed
    assert proc.take_aborts() == ["s"]                 # the engine must stop generating it
    assert proc.process(RequestOutput("s", [5])) is None   # late outputs are dropped
