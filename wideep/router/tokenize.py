"""Prompt -> token ids for prefix hashing, without torch.

`estimate` needs nothing: every 4 bytes of the UTF-8 prompt are one "token" (the 4 bytes read as
a little-endian uint32), llm-d's ~4 bytes/token estimate made exact enough to hash. A local
tokenizer directory (tokenizer.json [+ tokenizer_config.json with a chat template]) gives the
engine's own ids, which precise routing needs to match the engine's KV events (R#1861).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any


def request_text(body: dict[str, Any], chat: bool) -> str:
    """The prompt as text: the completions prompt, or chat messages as JSON (llm-d's estimate)."""
    if chat:
        return json.dumps(body.get("messages", []), separators=(",", ":"), ensure_ascii=False)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], str):
            return "".join(prompt)
        return ""
    return str(prompt)


def estimate_token_ids(data: bytes) -> list[int]:
    n = len(data) // 4
    ids = list(struct.unpack(f"<{n}I", data[: n * 4])) if n else []
    if len(data) % 4:
        ids.append(int.from_bytes(data[n * 4:].ljust(4, b"\0"), "little"))
    return ids


class LocalTokenizer:
    """tokenizer.json via `tokenizers`; chat templates rendered with jinja2 like transformers does."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        p = Path(path)
        tok_file = p / "tokenizer.json" if p.is_dir() else p
        if not tok_file.exists():
            raise ValueError(f"tokenizer: {tok_file} does not exist (give a directory holding tokenizer.json)")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        cfg_file = tok_file.parent / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.chat_template = self.config.get("chat_template")
        tpl_file = tok_file.parent / "chat_template.jinja"
        if self.chat_template is None and tpl_file.exists():
            self.chat_template = tpl_file.read_text()
        self._template = None

    def _special(self, key: str) -> str:
        v = self.config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return v or ""

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def token_ids_of(self, body: dict[str, Any], chat: bool) -> list[int]:
        if not chat:
            prompt = body.get("prompt", "")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                return list(prompt)
            return self.encode_prompt(request_text(body, False))
        if not self.chat_template:
            return self.encode_prompt(request_text(body, True))
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise ValueError(msg)

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        text = self._template.render(messages=body.get("messages", []), add_generation_prompt=True,
                                     bos_token=self._special("bos_token"), eos_token=self._special("eos_token"))
        # the template already carries BOS; do not add it twice
        return self.tokenizer.encode(text, add_special_tokens=False).ids
