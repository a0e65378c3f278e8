"""Fixtures for bench tests: an offline word-level tokenizer and the fake OpenAI server as a real
subprocess on an ephemeral loopback port."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from wideep.utils.net import free_port

FAKE = Path(__file__).parents[1] / "fake_openai_server.py"


def make_word_tokenizer(out: Path) -> Path:
    """tokenizer.json + tokenizer_config.json: specials, w0..w3999 and digits (bench-assets' builder minus
    punctuation, so that the fake server's whitespace word count equals the token count exactly)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for t in ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(4000)] + list("0123456789"):
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 1000000}))
    return out


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory) -> Path:
    return make_word_tokenizer(tmp_path_factory.mktemp("word-tokenizer"))


class FakeServer:
    def __init__(self, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "--port", str(self.port), "--max-seconds", "300", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake server exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("fake server did not start within 30s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def fake_server():
    """Factory: fake_server('--itl', '0.002', '--fail-every', '5') -> FakeServer (stopped at teardown)."""
    started: list[FakeServer] = []

    def start(*flags: str) -> FakeServer:
        s = FakeServer(*flags)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
