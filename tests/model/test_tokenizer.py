"""Tokenizer layer: chat templates and incremental detokenization that never splits a UTF-8 character."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from wideep.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = "héllo wörld, naïve café — 世界你好 🎉🚀 ok 日本語のテキスト ça va? ünïcödé 😀 fin"


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A small byte-level BPE trained here: multi-byte characters span several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world ok fin va"] * 50, trainer)
    d = tmp_path_factory.mktemp("bytelevel")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


def test_incremental_detokenizer_never_emits_half_a_character(byte_level_dir):
    tok = Tokenizer(byte_level_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # really split below character level
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.incremental_detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT == detok.text
    assert sum(1 for p in pieces if p) < len(ids)  # some steps held text back


def test_incremental_detokenizer_after_prompt_and_in_chunks(byte_level_dir):
    tok = Tokenizer(byte_level_dir)
    prompt = tok.encode("ok ", add_special_tokens=False)
    ids = tok.encode("ok " + TEXT, add_special_tokens=False)[len(prompt):]
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert out == tok.decode(prompt + ids)[len(tok.decode(prompt)):]


def test_flush_emits_a_trailing_incomplete_character(byte_level_dir):
    tok = Tokenizer(byte_level_dir)
    ids = tok.encode("ok 🎉", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add([i]) for i in ids[:-1])
    assert "\ufffd" not in text
    assert detok.flush().endswith("\ufffd")  # the stream ended mid-character: shown, not swallowed


def test_whole_word_tokenizer_streams_with_spaces(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    ids = tok.encode("the quick answer , in short", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("hello", add_special_tokens=True))
    out = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert out == " " + tok.decode(ids)


def test_chat_template_errors_and_generation_prompt(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<｜User｜>hi")
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-2:] == [tok.token_to_id("<｜Assistant｜>"), tok.token_to_id("<think>")]   # R1 opens the reasoning
    with pytest.raises(Exception, match="unsupported role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_model_without_chat_template(byte_level_dir):
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer(byte_level_dir).apply_chat_template([{"role": "user", "content": "x"}])
