"""/v1/completions and /v1/chat/completions: prompt -> token ids -> engine -> text, in vLLM's shapes.

Stream shape (OpenAI's, as vLLM sends it): `data: <json>\\n\\n` per engine step that produced text (the
chat stream opens with a role chunk), finish_reason on the last content chunk, a usage chunk with
`choices: []` when `stream_options.include_usage`, then `data: [DONE]`. A request whose client goes
away is aborted in the engine (its blocks are freed) by the engine client's generator cleanup.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from wideep.engine.api import EngineRequest, InvalidRequest, SamplingParams
from wideep.engine.output_processor import TextOutput
from wideep.server.errors import APIError, bad_request
from wideep.server.protocol import GenerateRequest, check_model, parse_chat, parse_completion
from wideep.server.state import FrontendState

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


@dataclass
class Prepared:
    req: GenerateRequest
    model: str
    prompt_ids: list[int]
    request_id: str          # engine request id and response id ("cmpl-…" / "chatcmpl-…")
    base_id: str             # X-Request-Id (echoed)
    created: int
    arrival: float


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


class OpenAIServing:
    """Handlers of one frontend; `state` holds the engine client, tokenizer and metrics."""

    def __init__(self, state: FrontendState):
        self.state = state

    # ---- request preparation -------------------------------------------------------------------
    async def _prepare(self, request: web.Request, kind: str) -> Prepared:
        arrival = time.monotonic()
        body = await read_json(request)
        req = parse_completion(body) if kind == "completion" else parse_chat(body)
        st = self.state
        model = check_model(req.model, st.served_model_names)
        tok = st.tokenizer
        if req.prompt_token_ids is not None:
            ids = req.prompt_token_ids
            bad = next((t for t in ids if t >= st.vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} in 'prompt' is out of range: the vocabulary has "
                                  f"{st.vocab_size} tokens", "prompt")
        elif req.prompt_text is not None:
            ids = tok.encode(req.prompt_text, add_special_tokens=req.add_special_tokens)
        else:
            try:
                ids = tok.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt,
                                              tokenize=True, **req.chat_template_kwargs)
            except Exception as e:  # jinja TemplateError from the template's raise_exception, etc.
                raise bad_request(f"chat template failed on 'messages': {e}", "messages") from None
            if req.add_special_tokens and tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + list(ids)
        self._check_length(req, len(ids))
        base = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        prefix = "cmpl-" if kind == "completion" else "chatcmpl-"
        rid = prefix + base
        if rid in st.inflight:  # a reused X-Request-Id must not collide inside the engine
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        return Prepared(req, model, list(ids), rid, base, int(time.time()), arrival)

    def _check_length(self, req: GenerateRequest, n: int) -> None:
        limit = self.state.max_model_len
        what = "messages" if req.kind == "chat" else "prompt"
        if n == 0:
            raise bad_request(f"'{what}' produced no tokens", what)
        if n >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your request has {n} input "
                f"tokens, which leaves no room for output. Please reduce the length of the {what}.", what)
        if req.max_tokens is not None and n + req.max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + req.max_tokens} tokens ({n} in the {what}, {req.max_tokens} in the completion). "
                f"Please reduce the length of the {what} or {req.max_tokens_param}.", req.max_tokens_param)

    def _sampling_params(self, req: GenerateRequest) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=req.seed, stop=list(req.stop), stop_token_ids=list(req.stop_token_ids),
                ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output)
        except InvalidRequest as e:
            raise bad_request(str(e), req.max_tokens_param if e.param == "max_tokens" else e.param) from None

    # ---- engine round trip ---------------------------------------------------------------------
    async def _generate(self, p: Prepared) -> AsyncIterator[TextOutput]:
        """Engine outputs as text; records metrics; always leaves the engine with nothing to do."""
        st = self.state
        sp = self._sampling_params(p.req)
        ereq = EngineRequest(p.request_id, p.prompt_ids, sp, kv_transfer_params=p.req.kv_transfer_params)
        st.output_processor.add_request(p.request_id, p.prompt_ids, sp, p.req.skip_special_tokens)
        st.inflight.add(p.request_id)
        agen = st.client.generate(ereq)
        last = None
        n_tokens = 0
        reason = "abort"
        try:
            async for out in agen:
                now = time.monotonic()
                if out.new_token_ids:
                    k = len(out.new_token_ids)
                    if last is None:
                        st.metrics.observe_first_token(now - p.arrival)
                        if k > 1:
                            st.metrics.observe_inter_token(0.0, k - 1)
                    else:
                        st.metrics.observe_inter_token(now - last, k)
                    last = now
                text_out = st.output_processor.process(out)
                for rid in st.output_processor.take_aborts():
                    await st.client.abort(rid)
                if text_out is None:
                    continue
                n_tokens = len(text_out.all_token_ids)
                if text_out.finished:
                    reason = text_out.finish_reason or "stop"
                yield text_out
                if text_out.finished:
                    return
        except InvalidRequest as e:
            reason = "error"
            param = p.req.max_tokens_param if e.param == "max_tokens" else e.param
            raise bad_request(str(e), param) from None
        finally:
            st.inflight.discard(p.request_id)
            st.output_processor.remove(p.request_id)
            await agen.aclose()  # not finished -> the client sends the abort: blocks are freed
            st.metrics.observe_finished(reason, time.monotonic() - p.arrival, len(p.prompt_ids), n_tokens)

    # ---- handlers ------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        p = await self._prepare(request, "completion")
        if p.req.stream:
            return await self._stream(request, p)
        return await self._full(request, p)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        p = await self._prepare(request, "chat")
        if p.req.stream:
            return await self._stream(request, p)
        return await self._full(request, p)

    async def _full(self, request: web.Request, p: Prepared) -> web.Response:
        text, final = [], None
        async for out in self._generate(p):
            text.append(out.text)
            final = out
        if final is None or not final.finished:
            raise APIError("the engine ended the request without a result", 500)
        if final.finish_reason == "error":
            raise APIError(f"generation failed: {final.error or 'engine error'}", 500)
        usage = _usage(len(p.prompt_ids), len(final.all_token_ids))
        joined = "".join(text)
        if p.req.kind == "completion":
            body = {"id": p.request_id, "object": "text_completion", "created": p.created, "model": p.model,
                    "choices": [{"index": 0, "text": joined, "logprobs": None, "finish_reason": final.finish_reason,
                                 "stop_reason": final.stop_reason, "prompt_logprobs": None}],
                    "usage": usage, "system_fingerprint": None, "service_tier": None,
                    "kv_transfer_params": final.kv_transfer_params}
        else:
            body = {"id": p.request_id, "object": "chat.completion", "created": p.created, "model": p.model,
                    "choices": [{"index": 0,
                                 "message": {"role": "assistant", "content": joined, "refusal": None,
                                             "annotations": None, "audio": None, "function_call": None,
                                             "tool_calls": [], "reasoning_content": None},
                                 "logprobs": None, "finish_reason": final.finish_reason,
                                 "stop_reason": final.stop_reason}],
                    "usage": usage, "prompt_logprobs": None, "system_fingerprint": None, "service_tier": None,
                    "kv_transfer_params": final.kv_transfer_params}
        return web.Response(text=_dumps(body), content_type="application/json",
                            headers={"X-Request-Id": p.base_id})

    async def _stream(self, request: web.Request, p: Prepared) -> web.StreamResponse:
        chat = p.req.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": p.request_id, "object": obj, "created": p.created, "model": p.model}
        n_prompt = len(p.prompt_ids)
        continuous = p.req.include_usage and p.req.continuous_usage_stats

        def chunk(text: str | None, finish: str | None, stop_reason: Any, n_out: int, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                if finish is not None:
                    choice["stop_reason"] = stop_reason
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                          "stop_reason": stop_reason}
            c = {**head, "choices": [choice]}
            if continuous:
                c["usage"] = _usage(n_prompt, n_out)
            return sse(c)

        gen = self._generate(p)
        # Pull the first output before committing to a 200 stream, so an engine rejection is a plain 400.
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, "X-Request-Id": p.base_id})
        await resp.prepare(request)
        n_out = 0
        try:
            if chat:
                await resp.write(chunk(None, None, None, 0, role=True))
            final = None
            out = first
            while out is not None:
                n_out = len(out.all_token_ids)
                if out.finished and out.finish_reason == "error":
                    await resp.write(sse(APIError(f"generation failed: {out.error or 'engine error'}", 500).body()))
                    break
                if out.text or out.finished:
                    await resp.write(chunk(out.text, out.finish_reason, out.stop_reason, n_out))
                if out.finished:
                    final = out
                    break
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    out = None
            if final is not None and p.req.include_usage:
                await resp.write(sse({**head, "choices": [], "usage": _usage(n_prompt, n_out)}))
        except APIError as e:
            await resp.write(sse(e.body()))
        except self.state.engine_errors as e:
            await resp.write(sse(APIError(f"engine failed: {e}", 503).body()))
        finally:
            await gen.aclose()
        await resp.write(DONE)
        await resp.write_eof()
        return resp


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None) from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", None) from None
