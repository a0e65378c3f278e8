"""/v1/completions and /v1/chat/completions: prompt -> token ids -> engine -> text, in vLLM's shapes.

Stream shape (OpenAI's, as vLLM sends it): `data: <json>\\n\\n` per engine step that produced text (the
chat stream opens with a role chunk), finish_reason on the last content chunk, a usage chunk with
`choices: []` when `stream_options.include_usage`, then `data: [DONE]`. A request whose client goes
away is aborted in the engine (its blocks are freed) by the engine client's generator cleanup.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from aiohttp import web

from wideep.engine.api import EngineRequest, InvalidRequest, SamplingParams
from wideep.engine.output_processor import TextOutput
from wideep.server.chat_output import ChatAssembler, ChatDelta
from wideep.server.errors import APIError, bad_request
from wideep.server.generation_defaults import apply_defaults, cap_max_tokens
from wideep.server.reasoning import PARSER_KWARGS, THINK_END, ReasoningSplitter
from wideep.server.tool_parser import named_tool_schema, required_tool_schema
from wideep.server.protocol import GenerateRequest, check_model, parse_chat, parse_completion
from wideep.server.state import FrontendState
from wideep.utils.chat_template import ChatTemplate, ChatTemplateError

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
    chat: ChatPlan | None = None


@dataclass
class ChatPlan:
    """How a chat request's output is read: reasoning split, tool mode, the constraint it needs."""

    reasoning: bool                         # the reasoning parser splits this request's output
    tool_mode: str = "none"                 # none | auto | named | required
    named: str | None = None
    schema: dict[str, Any] | None = None    # JSON schema the output must follow (named / required)


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
        st = self.state
        body = apply_defaults(body, st.chat.sampling_defaults)
        req = parse_completion(body) if kind == "completion" else parse_chat(body)
        req.max_tokens = cap_max_tokens(req.max_tokens, st.chat.sampling_defaults)
        model = check_model(req.model, st.served_model_names)
        tok = st.tokenizer
        plan = None
        if req.prompt_token_ids is not None:
            ids = req.prompt_token_ids
            bad = next((t for t in ids if t >= st.vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} in 'prompt' is out of range: the vocabulary has "
                                  f"{st.vocab_size} tokens", "prompt")
        elif req.prompt_text is not None:
            ids = tok.encode(req.prompt_text, add_special_tokens=req.add_special_tokens)
        else:
            plan = self._chat_plan(req)
            ids = await self.render_chat(req)
            if req.add_special_tokens and tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + list(ids)
        self._check_length(req, len(ids))
        base = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        prefix = "cmpl-" if kind == "completion" else "chatcmpl-"
        rid = prefix + base
        if rid in st.inflight:  # a reused X-Request-Id must not collide inside the engine
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        return Prepared(req, model, list(ids), rid, base, int(time.time()), arrival, plan)

    # ---- chat: template rendering, tool choice, reasoning ----------------------------------------
    def _chat_plan(self, req: GenerateRequest) -> ChatPlan:
        opts = self.state.chat
        parser = opts.reasoning_parser
        plan = ChatPlan(reasoning=parser is not None and parser.active_for(req.chat_template_kwargs))
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        if choice == "auto" and req.tools:
            if not (opts.enable_auto_tool_choice and opts.tool_call_parser):
                raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                  "to be set", "tool_choice")
            plan.tool_mode = "auto"
        elif choice == "required":
            plan.tool_mode, plan.schema = "required", required_tool_schema(req.tools)
        elif isinstance(choice, dict):
            name = choice["function"]["name"]
            tool = next(t for t in req.tools if t["function"]["name"] == name)
            plan.tool_mode, plan.named, plan.schema = "named", name, named_tool_schema(tool)
        return plan

    def _template_for(self, req: GenerateRequest) -> tuple[ChatTemplate, dict[str, Any]]:
        """The template this request renders with and the kwargs it passes; client templates only when
        the server trusts them; kwargs must be variables the template reads."""
        st = self.state
        kwargs = dict(req.chat_template_kwargs)
        client = req.chat_template
        param = "chat_template"
        if "chat_template" in kwargs:
            client, param = kwargs.pop("chat_template"), "chat_template_kwargs"
            if not isinstance(client, str):
                raise bad_request("chat_template_kwargs.chat_template must be a string", param)
        if client is not None:
            if not st.chat.trust_request_chat_template:
                raise bad_request("a chat template in the request is not allowed: the server renders with its own "
                                  "template (start it with --trust-request-chat-template to allow this)", param)
            template = ChatTemplate(client, st.tokenizer.bos_token or "", st.tokenizer.eos_token or "")
        elif st.tokenizer.chat_template is None:
            raise bad_request("this model has no chat template; use /v1/completions or start the server with "
                              "--chat-template", "messages")
        else:
            template = st.tokenizer.chat_template
        tools = self._rendered_tools(req)
        try:
            reads = template.variables(tools)
            # keys only the reasoning parser reads (thinking on/off) are allowed even if the template ignores them
            check = {k: v for k, v in kwargs.items() if not (k in PARSER_KWARGS and k not in reads)}
            template.check_kwargs(check, tools)
        except ChatTemplateError as e:
            raise bad_request(str(e), "chat_template_kwargs" if kwargs else param) from None
        return template, {k: v for k, v in kwargs.items() if k in reads}

    def _rendered_tools(self, req: GenerateRequest) -> list[dict[str, Any]] | None:
        if req.tool_choice == "none" and self.state.chat.exclude_tools_when_tool_choice_none:
            return None
        return req.tools

    async def render_chat(self, req: GenerateRequest) -> list[int]:
        """Prompt token ids of a chat request, rendered on a worker thread (bounded in time and size)."""
        template, kwargs = self._template_for(req)
        tools = self._rendered_tools(req)
        tok = self.state.tokenizer

        def render() -> list[int]:
            text = template.render(req.messages, add_generation_prompt=req.add_generation_prompt, tools=tools,
                                   continue_final_message=req.continue_final_message, **kwargs)
            return tok.encode(text, add_special_tokens=False)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.state.chat.render_pool, render)
        except ChatTemplateError as e:
            raise bad_request(f"chat template failed on 'messages': {e}", "messages") from None

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

    def _structured(self, p: Prepared) -> dict[str, Any]:
        """SamplingParams fields for a tool constraint (named / required tool_choice)."""
        if p.chat is None or p.chat.schema is None:
            return {}
        try:
            from wideep.engine.structured import StructuredOutputsParams
        except ImportError:
            raise bad_request(f"tool_choice {p.chat.tool_mode!r} needs constrained decoding (structured outputs), "
                              "which this build does not have yet", "tool_choice") from None
        end = self.state.tokenizer.token_to_id(THINK_END) if p.chat.reasoning else None
        so = StructuredOutputsParams(json=p.chat.schema, start_after_token_id=end)
        try:
            so.validate()
        except ValueError as e:
            raise bad_request(f"the tools' parameters cannot be enforced: {e}", "tools") from None
        return {"structured_outputs": so}

    def _sampling_params(self, req: GenerateRequest, extra: dict[str, Any] | None = None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=req.seed, stop=list(req.stop), stop_token_ids=list(req.stop_token_ids),
                ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, **(extra or {}))
        except InvalidRequest as e:
            raise bad_request(str(e), req.max_tokens_param if e.param == "max_tokens" else e.param) from None

    # ---- engine round trip ---------------------------------------------------------------------
    async def _generate(self, p: Prepared) -> AsyncIterator[TextOutput]:
        """Engine outputs as text; records metrics; always leaves the engine with nothing to do."""
        st = self.state
        sp = self._sampling_params(p.req, self._structured(p))
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
            asm = self._assembler(p)
            asm.feed(joined, final=True)
            calls = asm.finish()
            message = {"role": "assistant", "content": asm.message_content(), "refusal": None,
                       "annotations": None, "audio": None, "function_call": None, "tool_calls": calls}
            message.update(self._reasoning_fields(asm.reasoning if asm.reasoning_active else None, p))
            body = {"id": p.request_id, "object": "chat.completion", "created": p.created, "model": p.model,
                    "choices": [{"index": 0, "message": message,
                                 "logprobs": None, "finish_reason": asm.finish_reason(final.finish_reason),
                                 "stop_reason": final.stop_reason}],
                    "usage": usage, "prompt_logprobs": None, "system_fingerprint": None, "service_tier": None,
                    "kv_transfer_params": final.kv_transfer_params}
        return web.Response(text=_dumps(body), content_type="application/json",
                            headers={"X-Request-Id": p.base_id})

    def _assembler(self, p: Prepared) -> ChatAssembler:
        plan = p.chat
        return ChatAssembler(ReasoningSplitter(active=plan.reasoning), plan.tool_mode, plan.named, p.req.parallel_tool_calls,
                             p.req.include_reasoning)

    def _reasoning_fields(self, reasoning: str | None, p: Prepared) -> dict[str, Any]:
        """The message's reasoning under vLLM's name, DeepSeek's, or both (--reasoning-field)."""
        if not p.req.include_reasoning:
            reasoning = None
        where = self.state.chat.reasoning_field
        out: dict[str, Any] = {}
        if where in ("reasoning", "both"):
            out["reasoning"] = reasoning
        out["reasoning_content"] = reasoning if where in ("reasoning_content", "both") else None
        return out

    def _delta(self, d: ChatDelta, p: Prepared) -> dict[str, Any]:
        """A chat chunk's delta in vLLM's shape: only the fields this step produced."""
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta.update({k: v for k, v in self._reasoning_fields(d.reasoning, p).items() if v is not None})
        if d.content or (not d.reasoning and not d.tool_calls):
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
        return delta

    async def _stream(self, request: web.Request, p: Prepared) -> web.StreamResponse:
        chat = p.req.kind == "chat"
        asm = self._assembler(p) if chat else None
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": p.request_id, "object": obj, "created": p.created, "model": p.model}
        n_prompt = len(p.prompt_ids)
        continuous = p.req.include_usage and p.req.continuous_usage_stats

        def chunk(text: str | None, finish: str | None, stop_reason: Any, n_out: int, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else text
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
                if chat:
                    d = asm.feed(out.text, final=out.finished)
                    finish = out.finish_reason
                    if out.finished:
                        asm.finish()
                        finish = asm.finish_reason(out.finish_reason)
                    if not d.empty() or out.finished:
                        await resp.write(chunk(self._delta(d, p), finish, out.stop_reason, n_out))
                elif out.text or out.finished:
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
