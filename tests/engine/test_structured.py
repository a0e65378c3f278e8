"""Grammar-constrained decoding in the engine: reasoning first (start_after_token_id), preemption-free
batching with unconstrained neighbours, and the clear errors (no grammar engine, unusable tokenizer)."""
from __future__ import annotations

import json
import re
import sys

import pytest

from wideep.engine.api import InvalidRequest, SamplingParams
from wideep.engine.structured import GrammarEngine, GrammarUnavailable, StructuredOutputsParams

xgrammar = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def llm(tiny_byte_model_dir):
    from wideep.engine.llm import LLM
    return LLM(str(tiny_byte_model_dir), max_model_len=256, block_size=16, kv_cache_memory_bytes=32 << 20)


def test_constraint_starts_after_the_reasoning_end_token(llm):
    free = llm.generate(["the sea"], SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids
    end_think = free[1]        # stands in for </think>: the model reaches it on its own at step 2
    so = StructuredOutputsParams(regex=r"[0-9]{3}", start_after_token_id=end_think)
    out = llm.generate(["the sea"], SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=so))[0]
    assert out.token_ids[:2] == free[:2]                  # unconstrained up to and including the end token
    tail = llm.tokenizer.decode(out.token_ids[2:], skip_special_tokens=True)
    assert re.fullmatch(r"[0-9]{3}", tail), tail
    assert out.finish_reason == "stop"


def test_constrained_and_free_requests_share_a_batch(llm):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=i,
                             structured_outputs=StructuredOutputsParams(json=schema) if i % 2 else None)
              for i in range(6)]
    outs = llm.generate(["the sea"] * 6, params)
    for i, o in enumerate(outs):
        if i % 2:
            assert 0 <= json.loads(o.text)["n"] <= 9
    alone = llm.generate(["the sea"], params[0])[0]
    assert alone.token_ids == outs[0].token_ids           # a free neighbour is unaffected by the masks


def test_grammar_engine_missing_is_a_clear_error(tiny_byte_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)    # import fails as on an image without it
    with pytest.raises(GrammarUnavailable, match="not installed"):
        GrammarEngine.from_model_dir(tiny_byte_model_dir, 4096, {1})


def test_engine_turns_a_missing_grammar_engine_into_invalid_request(llm, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    saved = llm.core.grammar_engine
    llm.core.grammar_engine = None
    try:
        with pytest.raises(InvalidRequest, match="not installed") as e:
            llm.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")))
        assert e.value.param == "structured_outputs"
    finally:
        llm.core.grammar_engine = saved


def test_word_joining_tokenizer_is_refused_with_the_reason(tiny_model_dir):
    with pytest.raises(ValueError, match="does not map each token"):
        GrammarEngine.from_model_dir(tiny_model_dir, 4096, {1})


def _byte_token_ids(tokenizer) -> dict[int, int]:
    """byte -> id of the byte-level token that stands for that one byte (GPT-2's byte-to-character map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {b: tokenizer.token_to_id(c) for b, c in chars.items()}


@pytest.mark.parametrize("so", [dict(json={"type": "string", "maxLength": 4}), dict(json={"type": "string"}),
                                dict(json_object=True)])
def test_json_strings_take_only_valid_utf8(tiny_byte_model_dir, so):
    """Surrogate code points (ED A0..BF xx) are not UTF-8: they would decode to U+FFFD and overrun lengths."""
    from wideep.model.tokenizer import load_tokenizer

    byte_id = _byte_token_ids(load_tokenizer(tiny_byte_model_dir))
    engine = GrammarEngine.from_model_dir(tiny_byte_model_dir, 4096, {1})
    prefix = b"{" if so.get("json_object") else b""   # then an object key
    for seq, ok in [("果".encode(), True), (b"\xed\x9f\xbf", True), (b"\xed\xa0\x80", False), (b"\xed\xbf\xbf", False)]:
        g = engine.matcher(StructuredOutputsParams(**so))
        assert all(g.matcher.accept_token(byte_id[b]) for b in prefix + b'"')
        accepted = [g.matcher.accept_token(byte_id[b]) for b in seq]
        assert all(accepted) == ok, (seq, accepted)


@pytest.mark.parametrize("params,needle", [
    (dict(json={"type": "string", "not": {"const": "a"}}), "not"),
    (dict(json="{bad json"), "not valid JSON"),
    (dict(choice=[]), "choice"),
    (dict(regex="a", grammar="root ::= \"a\""), "exactly one"),
])
def test_unsupported_constraints_are_value_errors(params, needle):
    with pytest.raises(ValueError, match=needle):
        StructuredOutputsParams(**params).validate()


def test_async_scheduling_equals_sync_for_grammar_penalties_and_logprobs(tiny_byte_model_dir, llm):
    """Async scheduling does not launch a request whose sampling needs its in-flight token (grammar,
    penalties), so the outputs equal the synchronous engine's, logprobs included."""
    from wideep.engine.llm import LLM

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=1, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(max_tokens=10, temperature=1.0, seed=2, presence_penalty=1.5, frequency_penalty=0.5,
                             repetition_penalty=1.3, bad_words_token_ids=[[300], [301, 302]]),
              SamplingParams(max_tokens=10, temperature=0.8, seed=3, logprobs=3)]
    prompts = ["the sea", "hello world", "the cat sat"]
    sync = llm.generate(prompts, params)
    async_llm = LLM(str(tiny_byte_model_dir), max_model_len=256, block_size=16,
                    kv_cache_memory_bytes=32 << 20, async_scheduling=True)
    got = async_llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in sync]
    json.loads(got[0].text)
