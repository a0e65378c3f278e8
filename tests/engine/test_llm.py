"""Offline LLM API: text and token prompts, detokenized text, stop strings trimmed and aborted."""
from __future__ import annotations

import pytest

from wideep import LLM, SamplingParams
from wideep.engine.api import InvalidRequest


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), block_size=16, kv_cache_memory_bytes=8 << 20)
    yield llm
    assert not llm.core.has_unfinished() and llm.core.num_free_blocks == llm.core.num_blocks


def test_text_and_token_prompts(llm):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    text_out, ids_out, many = llm.generate("the quick brown fox", sp)[0], None, None
    ids = llm.tokenizer.encode("the quick brown fox")
    ids_out = llm.generate([ids], sp)[0]
    assert text_out.prompt_token_ids == ids == ids_out.prompt_token_ids
    assert text_out.token_ids == ids_out.token_ids and len(text_out.token_ids) == 12
    whole = llm.tokenizer.decode(ids + text_out.token_ids)
    assert text_out.text == ids_out.text and whole == llm.tokenizer.decode(ids) + text_out.text
    assert text_out.finish_reason == "length" and text_out.outputs[0] is text_out
    many = llm.generate(["a b c", {"prompt_token_ids": ids}], [SamplingParams(max_tokens=3, temperature=0), sp])
    assert len(many[0].token_ids) <= 3 and many[1].token_ids == ids_out.token_ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_trims_and_aborts(llm, include):
    prompt = "one two three"
    full = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    words = full.text.split()
    assert len(words) > 6
    stop = " " + words[4]                       # a word in the middle of the completion
    cut = full.text.index(stop)
    out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                              include_stop_str_in_output=include))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (full.text[:cut + len(stop)] if include else full.text[:cut])
    assert len(out.token_ids) < 24               # the engine stopped early (aborted after the stop string)
    assert out.token_ids == full.token_ids[:len(out.token_ids)]


def test_invalid_prompt_names_field(llm):
    with pytest.raises(InvalidRequest) as err:
        llm.generate([[]], SamplingParams(max_tokens=2))
    assert err.value.param == "prompt"
    with pytest.raises(InvalidRequest) as err:
        llm.generate(["x", "y"], [SamplingParams()])
    assert err.value.param == "sampling_params"
