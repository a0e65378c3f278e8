"""Structured output, logprobs, n / best_of, penalties and the other sampling fields through a real
`wideep serve` (tiny model with a byte-level tokenizer, 2 DP ranks) and the official openai client."""
from __future__ import annotations

import json
import math
import random
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from server_harness import API_KEY, http, start_server, stop_server

pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def server(tiny_byte_model_dir, tmp_path_factory):
    srv = start_server(tiny_byte_model_dir, tmp_path_factory.mktemp("sampling"), dp_size=2, kv_events=False)
    try:
        yield srv
    finally:
        stop_server(srv)


def client(server, rank=0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url(rank) + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def post(server, path, body, rank=0):
    status, _, raw = http("POST", server.url(rank) + path, body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=120)
    return status, json.loads(raw)


CHAT = [{"role": "user", "content": "tell me about the sea"}]


# ---- structured output ----------------------------------------------------------------------------
def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Bounded schemas (short strings, small arrays, ranged integers) so a random model finishes them."""
    kinds = ["string", "integer", "boolean", "enum", "array", "null"] + (["object"] if depth < 2 else [])
    props = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(kinds)
        name = rng.choice(["id", "name", "ok", "tags", "size", "kind", "sub", "note"]) + str(i)
        if kind == "string":
            props[name] = {"type": "string", "maxLength": rng.randint(1, 6)}
        elif kind == "integer":
            lo = rng.randint(-50, 50)
            props[name] = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
        elif kind == "boolean":
            props[name] = {"type": "boolean"}
        elif kind == "null":
            props[name] = {"type": "null"}
        elif kind == "enum":
            props[name] = {"enum": rng.sample(["red", "green", "blue", "x", "y z"], rng.randint(1, 3))}
        elif kind == "array":
            props[name] = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                           "maxItems": rng.randint(1, 3)}
        else:
            props[name] = random_schema(rng, depth + 1)
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


def test_json_schema_outputs_validate_on_50_random_schemas(server):
    rng = random.Random(17)
    schemas = [random_schema(rng) for _ in range(50)]

    def one(i):
        r = client(server, i % 2).chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=200, temperature=1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i],
                                                                     "strict": True}})
        return r.choices[0]

    with ThreadPoolExecutor(25) as pool:       # batched on the engines
        choices = list(pool.map(one, range(50)))
    for schema, c in zip(schemas, choices):
        assert c.finish_reason == "stop", (schema, c.message.content)
        jsonschema.validate(json.loads(c.message.content), schema)


def test_choice_regex_grammar_and_aliases(server, tiny_byte_model_dir):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=1.0, n=4, seed=3,
                                  extra_body={"guided_choice": ["alpha", "beta gamma", "delta"]})
    assert {ch.message.content for ch in r.choices} <= {"alpha", "beta gamma", "delta"}
    r = c.completions.create(model="tiny", prompt="the sea", max_tokens=20, temperature=1.0, seed=1,
                             extra_body={"structured_outputs": {"regex": r"[a-f]{2,4}-\d{3}"}})
    import re
    assert re.fullmatch(r"[a-f]{2,4}-\d{3}", r.choices[0].text), r.choices[0].text
    r = c.completions.create(model="tiny", prompt="the sea", max_tokens=20, temperature=1.0, seed=2,
                             extra_body={"guided_grammar": 'root ::= ("yes" | "no") "!"'})
    assert r.choices[0].text in ("yes!", "no!")
    from wideep.model.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_byte_model_dir)
    closing = {str(tok.token_to_id(t)): 10.0 for t in ('"', "}", '"}') if tok.token_to_id(t) is not None}
    r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100, temperature=0.0,
                                  response_format={"type": "json_object"}, logit_bias=closing)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_structured_streaming_and_prefix_cache_repeat_identically(server):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "b": {"type": "string", "maxLength": 5}},
              "required": ["a", "b"], "additionalProperties": False}
    body = dict(model="tiny", messages=CHAT, max_tokens=60, temperature=0.0,
                extra_body={"guided_json": schema})
    first = client(server).chat.completions.create(**body).choices[0].message.content
    again = client(server).chat.completions.create(**body).choices[0].message.content   # prefix-cache hit
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       client(server).chat.completions.create(stream=True, **body) if ch.choices)
    assert first == again == streamed
    jsonschema.validate(json.loads(first), schema)


@pytest.mark.parametrize("body,param,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "response_format", "not"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "grammar"),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "only one"),
    ({"structured_outputs": {"json": {}, "backend": "outlines"}}, "structured_outputs", "backend"),
    ({"priority": 1}, "priority", "priority"),
    ({"use_beam_search": True}, "use_beam_search", "beam"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"best_of": 2}, "best_of", "completions"),
    ({"logit_bias": {"999999": 1}}, "logit_bias", "out of range"),
    ({"allowed_token_ids": [999999]}, "allowed_token_ids", "out of range"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"truncation_side": "right", "truncate_prompt_tokens": 3}, "truncation_side", "left"),
    ({"cache_salt": "abc"}, "cache_salt", "salt"),
])
def test_unsupported_or_bad_fields_are_400_naming_them(server, body, param, needle):
    status, resp = post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 4, **body})
    assert status == 400, resp
    assert resp["error"]["param"] == param and needle in resp["error"]["message"], resp


def test_completion_only_fields_are_400(server):
    for body, param in (({"suffix": "end"}, "suffix"), ({"best_of": 2, "stream": True}, "best_of"),
                        ({"prompt_logprobs": 2, "stream": True}, "prompt_logprobs")):
        status, resp = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4, **body})
        assert status == 400 and resp["error"]["param"] == param, resp


# ---- logprobs ---------------------------------------------------------------------------------------
def test_chat_logprobs_equal_the_prompt_logprobs_of_the_same_tokens(server):
    """Decode-step logprobs (KV cache, batched sampler) equal the prefill's log_softmax over the same
    sequence, fed back as a prompt: two code paths, one distribution."""
    r = client(server).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0.0,
                                               logprobs=True, top_logprobs=5, extra_body={"return_token_ids": True})
    ch = r.choices[0]
    content = ch.logprobs.content
    assert len(content) == len(ch.token_ids) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 5
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)   # greedy: the top token
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        assert item.bytes == list(item.token.encode())
    prompt_ids = r.model_extra["prompt_token_ids"]
    status, ref = post(server, "/v1/completions", {"model": "tiny", "prompt": prompt_ids + ch.token_ids,
                                                   "max_tokens": 1, "prompt_logprobs": 5})
    assert status == 200, ref
    plp = ref["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompt_ids) + len(ch.token_ids)
    for k, (tid, item) in enumerate(zip(ch.token_ids, content)):
        entry = plp[len(prompt_ids) + k][str(tid)]
        assert entry["rank"] == 1
        assert entry["logprob"] == pytest.approx(item.logprob, abs=2e-3)


def test_completion_logprobs_and_echo_shapes(server):
    r = client(server).completions.create(model="tiny", prompt="the sea is", max_tokens=5, temperature=1.0, seed=4,
                                          logprobs=3, echo=True)
    c = r.choices[0]
    assert c.text.startswith("the sea is")
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    for tok, x, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[tok] == pytest.approx(x) and 3 <= len(top) <= 4
    assert lp.text_offset == sorted(lp.text_offset)


def test_streamed_logprobs_add_up_to_the_full_ones(server):
    kw = dict(model="tiny", prompt="the sea", max_tokens=6, temperature=0.0, logprobs=2)
    full = client(server).completions.create(**kw).choices[0].logprobs
    toks, lps = [], []
    for ch in client(server).completions.create(stream=True, **kw):
        if ch.choices and ch.choices[0].logprobs:
            toks += ch.choices[0].logprobs.tokens
            lps += ch.choices[0].logprobs.token_logprobs
    assert toks == full.tokens and lps == pytest.approx(full.token_logprobs)


# ---- n, best_of, seeds --------------------------------------------------------------------------------
def test_n_choices_use_seed_plus_index(server):
    kw = dict(model="tiny", prompt="the sea", max_tokens=6, temperature=1.0)
    r = client(server).completions.create(n=3, seed=100, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client(server).completions.create(seed=100 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in r.choices] == singles
    assert r.usage.completion_tokens == 18
    stream = client(server).completions.create(n=3, seed=100, stream=True, **kw)
    texts = ["", "", ""]
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == singles


def test_best_of_returns_the_highest_cumulative_logprob(server):
    kw = dict(model="tiny", prompt="the sea", max_tokens=5, temperature=1.0)
    r = client(server).completions.create(best_of=4, n=1, seed=7, **kw)
    cands = []
    for i in range(4):
        c = client(server).completions.create(seed=7 + i, logprobs=0, **kw).choices[0]
        cands.append((sum(c.logprobs.token_logprobs), c.text))
    assert r.choices[0].text == max(cands)[1]
    assert r.choices[0].logprobs is None


# ---- distribution transforms seen through logprobs ------------------------------------------------------
def test_presence_and_frequency_penalties_pick_the_penalized_argmax(server):
    """Greedy under additive penalties = argmax of raw logprob - f*count - p*seen over the candidates."""
    f, p = 1.5, 0.7
    r = client(server).completions.create(model="tiny", prompt="the sea the sea", max_tokens=12, temperature=0.0,
                                          frequency_penalty=f, presence_penalty=p, logprobs=20,
                                          extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    counts: dict[str, int] = {}
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        score = {t: v - f * counts.get(t, 0) - p * (t in counts) for t, v in top.items()}
        best = max(score.values())
        assert score[tok] == pytest.approx(best, abs=1e-4), (tok, score)
        counts[tok] = counts.get(tok, 0) + 1


def test_min_p_logit_bias_allowed_and_bad_words(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="the sea", max_tokens=10, temperature=1.0, seed=5, logprobs=1,
                             extra_body={"min_p": 0.5})
    for x, top in zip(r.choices[0].logprobs.token_logprobs, r.choices[0].logprobs.top_logprobs):
        assert x >= max(top.values()) + math.log(0.5) - 1e-4
    tid = 300
    r = c.completions.create(model="tiny", prompt="the sea", max_tokens=6, temperature=1.0, seed=5,
                             logit_bias={str(tid): 100}, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == [tid] * 6
    allowed = [300, 301, 302]
    r = c.completions.create(model="tiny", prompt="the sea", max_tokens=8, temperature=1.0, seed=6,
                             extra_body={"allowed_token_ids": allowed, "return_token_ids": True})
    assert set(r.choices[0].model_extra["token_ids"]) <= set(allowed)
    greedy = c.completions.create(model="tiny", prompt="the sea", max_tokens=1, temperature=0.0).choices[0].text
    word = greedy.strip()
    r = c.completions.create(model="tiny", prompt="the sea", max_tokens=8, temperature=0.0,
                             extra_body={"bad_words": [word]})
    assert word not in r.choices[0].text


def test_truncate_prompt_tokens_keeps_the_last_tokens(server):
    long = " ".join(["the sea"] * 40)
    r = client(server).completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0.0,
                                          extra_body={"truncate_prompt_tokens": 10, "return_token_ids": True})
    assert r.usage.prompt_tokens == 10


# ---- stop semantics -----------------------------------------------------------------------------------
def test_stop_token_text_excluded_unless_asked_and_stop_strings_wait_for_min_tokens(server):
    c = client(server)
    kw = dict(model="tiny", prompt="the sea", temperature=0.0, max_tokens=8)
    base = c.completions.create(extra_body={"return_token_ids": True}, **kw).choices[0]
    ids = base.model_extra["token_ids"]
    stop_id = ids[2]
    cut = c.completions.create(extra_body={"stop_token_ids": [stop_id], "return_token_ids": True}, **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_id
    assert cut.model_extra["token_ids"] == ids[:3]
    kept = c.completions.create(extra_body={"stop_token_ids": [stop_id], "include_stop_str_in_output": True},
                                **kw).choices[0]
    assert len(kept.text) > len(cut.text) and kept.text.startswith(cut.text)
    first_piece = base.text[:2]
    early = c.completions.create(stop=[first_piece], **kw).choices[0]
    assert early.text == "" and early.finish_reason == "stop"
    late = c.completions.create(stop=[first_piece], extra_body={"min_tokens": 4}, **kw).choices[0]
    assert len(late.text) > len(first_piece) and base.text.startswith(late.text)


def test_streamed_token_ids_add_up(server):
    kw = dict(model="tiny", prompt="the sea", max_tokens=5, temperature=0.0, extra_body={"return_token_ids": True})
    full = client(server).completions.create(**kw).choices[0].model_extra["token_ids"]
    streamed = []
    for ch in client(server).completions.create(stream=True, **kw):
        if ch.choices:
            streamed += ch.choices[0].model_extra.get("token_ids") or []
    assert streamed == full
