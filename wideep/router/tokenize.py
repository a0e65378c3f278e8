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

from wideep.utils.chat_template import (RESERVED_VARIABLES, ChatTemplate, ChatTemplateError, MessageError,
                                        model_dir_template, normalize_messages, normalize_tools)


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
        src = model_dir_template(tok_file.parent, self.config)
        self.chat_template = (ChatTemplate(src, self._special("bos_token"), self._special("eos_token"))
                              if src is not None else None)

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
        try:
            text = self.render_chat(body)
        except (ChatTemplateError, MessageError):   # the server answers this body with a 400: estimate
            return self.encode_prompt(request_text(body, True))
        # the template already carries BOS; do not add it twice
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_chat(self, body: dict[str, Any]) -> str:
        """The prompt text the engine renders for this chat body (same renderer, same arguments)."""
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            kwargs = {}
        kwargs = {k: v for k, v in kwargs.items() if k not in RESERVED_VARIABLES}
        agp = body.get("add_generation_prompt", True)
        tools = normalize_tools(body.get("tools") or None)
        return self.chat_template.render(normalize_messages(body.get("messages")), add_generation_prompt=agp is not False,
                                         tools=tools, continue_final_message=body.get("continue_final_message") is True,
                                         **kwargs)


class RemoteTokenizer:
    """Token ids from the model server itself: POST /v1/chat/completions/render (vLLM) for chat,
    falling back to POST /tokenize {"messages"} when the server has no render endpoint, and
    /tokenize {"prompt"} for completions. Any failure returns None (the caller estimates)."""

    RENDER = "/v1/chat/completions/render"

    def __init__(self, url: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = None
        self.render_missing: set[str] = set()   # base URLs that answered 404/405 to render
        self.calls = 0
        self.failures = 0

    def _base(self, eps) -> str | None:
        if self.url:
            return self.url
        if not eps:
            return None
        import random

        return f"http://{random.choice(eps).address}"

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _post(self, url: str, payload: dict) -> tuple[int, Any]:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self.session.post(url, json=payload) as r:
            if r.status != 200:
                return r.status, None
            return 200, await r.json(content_type=None)

    async def token_ids(self, req, eps) -> list[int] | None:
        import asyncio
        import logging

        import aiohttp

        body = req.body
        chat = req.path.endswith("/chat/completions")
        if not chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return list(prompt)
        base = self._base(eps)
        if base is None:
            return None
        self.calls += 1
        try:
            if chat and base not in self.render_missing:
                payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
                status, doc = await self._post(base + self.RENDER, payload)
                if status == 200:
                    ids = extract_token_ids(doc)
                    if ids is not None:
                        return ids
                if status in (404, 405):
                    self.render_missing.add(base)
                elif status != 200:
                    raise RuntimeError(f"render answered HTTP {status}")
            payload = {"model": body.get("model"), ("messages" if chat else "prompt"):
                       body.get("messages", []) if chat else request_text(body, False)}
            status, doc = await self._post(base + "/tokenize", payload)
            ids = extract_token_ids(doc) if status == 200 else None
            if ids is None:
                raise RuntimeError(f"/tokenize answered HTTP {status}" if status != 200 else "/tokenize: no token ids")
            return ids
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError, ValueError) as exc:
            self.failures += 1
            if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                logging.getLogger(__name__).warning(
                    "token-producer: remote tokenization at %s failed (%s); using the estimate (%d failures)",
                    base, exc, self.failures)
            return None


def extract_token_ids(doc: Any) -> list[int] | None:
    """Token ids out of a /tokenize or render answer ({"tokens"}, {"prompt_token_ids"}, {"token_ids"},
    possibly one level down, or a one-element list of those)."""
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]
    if not isinstance(doc, dict):
        return None
    for key in ("tokens", "prompt_token_ids", "token_ids"):
        v = doc.get(key)
        if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
    for v in doc.values():
        if isinstance(v, dict):
            ids = extract_token_ids(v)
            if ids is not None:
                return ids
    return None
