"""Sends one OpenAI request and times it the way inference-perf does.

Streaming: the SSE body is split on blank lines; each event is stamped when it is parsed; only
events whose choice carries non-empty text count as chunks (role-only and usage-only events do
not); `usage` is merged from any event that has one (the final `choices: []` event); parsing
stops at `data: [DONE]`. Errors become labelled failures, never exceptions.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

import aiohttp

from .config import BenchConfig
from .datagen import Prompt
from .records import RequestRecord
from .tokenizer import BenchTokenizer


def build_body(cfg: BenchConfig, prompt: Prompt, model: str) -> dict[str, Any]:
    stream = cfg.api.streaming
    body: dict[str, Any] = {"model": model}
    if cfg.api.type == "chat":
        messages = ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
            {"role": "user", "content": prompt.text}]
        body.update(messages=messages, max_tokens=prompt.max_tokens)
    else:
        body.update(prompt=prompt.text, max_tokens=prompt.max_tokens)
    body.update(ignore_eos=cfg.server.ignore_eos, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _content(data: dict, chat: bool) -> Optional[str]:
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if chat:
        return (choice.get("delta") or {}).get("content")
    return choice.get("text")


async def read_sse(resp: aiohttp.ClientResponse, rec: RequestRecord, chat: bool) -> None:
    buffer = b""
    raw = bytearray()
    try:
        async for piece in resp.content.iter_any():
            raw += piece
            buffer += piece
            done = False
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                now = time.perf_counter()
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    try:
                        data = json.loads(payload)
                    except json.JSONDecodeError:
                        continue
                    if not isinstance(data, dict):
                        continue
                    usage = data.get("usage")
                    if isinstance(usage, dict):
                        rec.server_usage = {**(rec.server_usage or {}), **usage}
                    text = _content(data, chat)
                    if text:
                        rec.output_text += text
                        rec.chunk_times.append(now)
                        rec.chunk_texts.append(text)
                        rec.response_chunks.append(payload.decode("utf-8", "ignore"))
                if done:
                    break
            if done:
                break
    finally:
        rec.response_data = raw.decode("utf-8", "ignore")


def _timeout_label_msg() -> tuple[str, str]:
    return "TimeoutError", "Request timed out"


async def send_request(session: aiohttp.ClientSession, cfg: BenchConfig, tok: Optional[BenchTokenizer],
                       prompt: Prompt, model: str, stage_id: int, scheduled_time: float) -> RequestRecord:
    """POST one request; returns its record whether it succeeded or not."""
    chat = cfg.api.type == "chat"
    body = build_body(cfg, prompt, model)
    data = json.dumps(body)
    headers = {"Content-Type": "application/json"}
    if cfg.server.api_key:
        headers["Authorization"] = f"Bearer {cfg.server.api_key}"
    if cfg.api.headers:
        headers.update({str(k): str(v) for k, v in cfg.api.headers.items()})
    url = cfg.server.base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    timeout = aiohttp.ClientTimeout(total=cfg.load.request_timeout) if cfg.load.request_timeout else None
    start = time.perf_counter()
    rec = RequestRecord(stage_id=stage_id, scheduled_time=scheduled_time, start_time=start, end_time=start,
                        request_data=data, streamed=cfg.api.streaming)
    try:
        async with session.post(url, data=data, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                rec.response_data = await resp.text()
                rec.error_type, rec.error_msg = f"HTTP Error {resp.status}", rec.response_data
            elif cfg.api.streaming:
                try:
                    await read_sse(resp, rec, chat)
                except asyncio.TimeoutError:
                    rec.error_type, rec.error_msg = _timeout_label_msg()
                except Exception as exc:  # broken stream: the bytes so far are kept in response_data
                    rec.error_type, rec.error_msg = type(exc).__name__, str(exc)
            else:
                rec.response_data = await resp.text()
                payload = json.loads(rec.response_data)
                rec.server_usage = payload.get("usage")
                choices = payload.get("choices") or []
                if choices:
                    ch = choices[0]
                    rec.output_text = (ch.get("message") or {}).get("content") or "" if chat else ch.get("text") or ""
    except asyncio.TimeoutError:
        rec.error_type, rec.error_msg = _timeout_label_msg()
    except aiohttp.ClientError as exc:
        rec.error_type, rec.error_msg = type(exc).__name__, str(exc)
    except Exception as exc:  # noqa: BLE001 - a benchmark counts every failure, it never crashes on one
        rec.error_type, rec.error_msg = type(exc).__name__, str(exc)
    rec.end_time = time.perf_counter()
    _count_tokens(rec, tok, body, chat)
    return rec


def _count_tokens(rec: RequestRecord, tok: Optional[BenchTokenizer], body: dict, chat: bool) -> None:
    usage = rec.server_usage or {}
    if usage.get("prompt_tokens") is not None:
        rec.input_tokens = int(usage["prompt_tokens"])
    elif tok is not None:
        text = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        rec.input_tokens = tok.count_tokens(text)
    if rec.ok:
        if tok is not None:
            rec.output_tokens = tok.count_tokens(rec.output_text, add_special_tokens=False)
        elif usage.get("completion_tokens") is not None:
            rec.output_tokens = int(usage["completion_tokens"])
