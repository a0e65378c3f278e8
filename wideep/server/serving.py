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
from wideep.engine.structured import StructuredOutputsParams
from wideep.engine.output_processor import TextOutput
from wideep.kv_transfer.params import VALIDATE_ONLY_HEADER
from wideep.kv_transfer.peers import PeerNotAllowed, check_kv_transfer_params
from wideep.server.chat_output import ChatAssembler, ChatDelta
from wideep.server.errors import APIError, bad_request
from wideep.server.generation_defaults import apply_defaults, cap_max_tokens
from wideep.server.reasoning import PARSER_KWARGS, THINK_END, ReasoningSplitter
from wideep.server.tool_parser import named_tool_schema, required_tool_schema
from wideep.server.logprobs import LogprobFormatter
from wideep.server.protocol import GenerateRequest, check_model, parse_chat, parse_completion
from wideep.server.state import FrontendState
from wideep.utils.openai_errors import client_message
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
    bad_words_ids: list[list[int]] | None = None
    prompt_text: str | None = None   # completions echo: the prompt as text

    @property
    def num_seqs(self) -> int:
        """Engine requests behind this HTTP request: n choices, or best_of candidates."""
        return max(self.req.n, self.req.best_of or 0)

    def engine_id(self, index: int) -> str:
        return self.request_id if self.num_seqs == 1 else f"{self.request_id}-{index}"


@dataclass
class Choice:
    """One finished sequence of a non-streamed request."""

    index: int
    text: str
    final: TextOutput
    logprobs: list[list[Any]] | None
    prompt_logprobs: list[list[Any]] | None

    @property
    def cumulative_logprob(self) -> float:
        return sum(e[0] for e in self.logprobs or [])


def _wrap_int64(v: int) -> int:
    return (v + 2 ** 63) % 2 ** 64 - 2 ** 63


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
        """Parse, check and tokenize; everything heavy runs off the event loop, after the cheap
        bounds that let an oversized prompt be refused before any work (the loop must keep
        answering /health while one client sends megabytes)."""
        arrival = time.monotonic()
        body = await read_json(request)
        st = self.state
        body = apply_defaults(body, st.chat.sampling_defaults)
        req = parse_completion(body) if kind == "completion" else parse_chat(body)
        req.max_tokens = cap_max_tokens(req.max_tokens, st.chat.sampling_defaults)
        model = check_model(req.model, st.served_model_names)
        self._check_kv_peer(req)
        loop = asyncio.get_running_loop()
        tok = st.tokenizer
        plan = None
        if req.prompt_token_ids is not None:
            ids = req.prompt_token_ids
            self._check_length(req, len(ids))   # before the per-token scan: 5M ids are refused at once
            bad = next((t for t in ids if t >= st.vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} in 'prompt' is out of range: the vocabulary has "
                                  f"{st.vocab_size} tokens", "prompt")
        elif req.prompt_text is not None:
            self._check_chars(req, req.prompt_text)
            ids = await loop.run_in_executor(None, self._encode, req.prompt_text, req.add_special_tokens)
        else:
            plan = self._chat_plan(req)
            ids = await self.render_chat(req)
            if req.add_special_tokens and tok.bos_token_id is not None:
                ids = [tok.bos_token_id] + list(ids)
        ids = self._truncate(req, list(ids))
        self._check_length(req, len(ids))
        if req.prompt_logprobs is not None and req.stream and not req.echo:
            raise bad_request("'prompt_logprobs' are not available when 'stream' is true", "prompt_logprobs")
        base = request.headers.get("X-Request-Id") or req.request_id or uuid.uuid4().hex
        prefix = "cmpl-" if kind == "completion" else "chatcmpl-"
        rid = prefix + base
        if rid in st.inflight:  # a reused X-Request-Id must not collide inside the engine
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        for i in range(1, max(req.n, req.best_of or 0)):
            if f"{rid}-{i}" in st.inflight:
                rid = f"{rid}-{uuid.uuid4().hex[:8]}"
                break
        prompt_text = None
        if req.echo and kind == "completion":
            prompt_text = req.prompt_text if req.prompt_text is not None else tok.decode(ids, skip_special_tokens=False)
        return Prepared(req, model, list(ids), rid, base, int(time.time()), arrival,
                        bad_words_ids=self._bad_words(req), prompt_text=prompt_text, chat=plan)

    def _truncate(self, req: GenerateRequest, ids: list[int]) -> list[int]:
        """truncate_prompt_tokens: keep the last k tokens (-1: as many as the context holds), as vLLM."""
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        if k == -1:
            k = self.state.max_model_len
        if k > self.state.max_model_len:
            raise bad_request(f"'truncate_prompt_tokens' ({k}) must be <= max_model_len "
                              f"({self.state.max_model_len})", "truncate_prompt_tokens")
        return ids[-k:] if k else []

    def _bad_words(self, req: GenerateRequest) -> list[list[int]]:
        """Each bad word as token sequences, with and without a leading space (as vLLM tokenizes them)."""
        out: list[list[int]] = []
        for word in req.bad_words:
            for prefix in ("", " "):
                ids = self.state.tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

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
            self._check_chars(req, text)   # a rendering no context can hold is refused before tokenizing
            return tok.encode(text, add_special_tokens=False)

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.state.chat.render_pool, render)
        except ChatTemplateError as e:
            raise bad_request(f"chat template failed on 'messages': {e}", "messages") from None

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.state.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_chars(self, req: GenerateRequest, text: str) -> None:
        """Before tokenizing: a text longer than max_model_len tokens can spell, or one that is not
        Unicode at all, is refused at once."""
        what = "messages" if req.kind == "chat" else "prompt"
        limit = self.state.max_prompt_chars
        if limit is not None and len(text) > limit:
            raise bad_request(
                f"This model's maximum context length is {self.state.max_model_len} tokens. However, your "
                f"{what} has {len(text)} characters, more than any {self.state.max_model_len} tokens can spell. "
                f"Please reduce the length of the {what}.", what)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate ("\ud800" in the JSON) is no text to tokenize
            raise bad_request(f"'{what}' is not valid Unicode: {e.reason} at position {e.start}", what) from None

    def _check_kv_peer(self, req: GenerateRequest) -> None:
        """kv_transfer_params naming a KV producer outside the pool are refused before anything connects."""
        try:
            check_kv_transfer_params(req.kv_transfer_params, self.state.kv_peers)
        except PeerNotAllowed as e:
            raise APIError(str(e), 403, "kv_transfer_params") from None

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

    def _structured(self, p: Prepared) -> StructuredOutputsParams | None:
        """The request's constraint: its own structured output, or a tool choice's schema (named / required)."""
        if p.chat is None or p.chat.schema is None:
            return p.req.structured_outputs
        if p.req.structured_outputs is not None:
            raise bad_request(f"tool_choice {p.chat.tool_mode!r} already constrains the output; drop "
                              f"'{p.req.structured_param}'", p.req.structured_param)
        end = self.state.tokenizer.token_to_id(THINK_END) if p.chat.reasoning else None
        so = StructuredOutputsParams(json=p.chat.schema, start_after_token_id=end)
        try:
            so.validate()
        except ValueError as e:
            raise bad_request(f"the tools' parameters cannot be enforced: {e}", "tools") from None
        return so

    def _sampling_params(self, p: Prepared, index: int = 0) -> SamplingParams:
        req = p.req
        logprobs = req.logprobs
        if logprobs is None and p.num_seqs > req.n:
            logprobs = 0            # best_of ranks candidates by their cumulative logprob
        try:
            return SamplingParams(
                max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=_wrap_int64(req.seed + index) if req.seed is not None else None,   # seed + i per choice, as vLLM
                stop=list(req.stop), stop_token_ids=list(req.stop_token_ids),
                ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, logit_bias=dict(req.logit_bias), min_p=req.min_p,
                bad_words_token_ids=list(p.bad_words_ids or []), allowed_token_ids=req.allowed_token_ids,
                logprobs=logprobs, prompt_logprobs=req.prompt_logprobs if index == 0 else None,
                structured_outputs=self._structured(p))
        except InvalidRequest as e:
            raise bad_request(str(e), self._param(req, e.param)) from None

    @staticmethod
    def _param(req: GenerateRequest, param: str | None) -> str | None:
        """The request field an engine-side error is about."""
        return {"max_tokens": req.max_tokens_param, "structured_outputs": req.structured_param,
                "bad_words_token_ids": "bad_words"}.get(param, param)

    def _validated(self, p: Prepared) -> web.Response:
        """The answer to a validate-only request: it would have been accepted (nothing reached the engine)."""
        sp = self._sampling_params(p)
        try:
            sp.validate()
        except InvalidRequest as e:
            raise bad_request(str(e), self._param(p.req, e.param)) from None
        return web.json_response({"valid": True, "prompt_tokens": len(p.prompt_ids)})

    # ---- engine round trip ---------------------------------------------------------------------
    async def _generate(self, p: Prepared, index: int = 0) -> AsyncIterator[TextOutput]:
        """Engine outputs as text; records metrics; always leaves the engine with nothing to do."""
        st = self.state
        sp = self._sampling_params(p, index)
        rid = p.engine_id(index)
        # P/D: one remote KV transfer per request; further choices compute the prompt here.
        ereq = EngineRequest(rid, p.prompt_ids, sp, kv_transfer_params=p.req.kv_transfer_params if index == 0 else None)
        st.output_processor.add_request(rid, p.prompt_ids, sp, p.req.skip_special_tokens)
        st.inflight.add(rid)
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
            raise bad_request(str(e), self._param(p.req, e.param)) from None
        finally:
            st.inflight.discard(rid)
            st.output_processor.remove(rid)
            await agen.aclose()  # not finished -> the client sends the abort: blocks are freed
            st.metrics.observe_finished(reason, time.monotonic() - p.arrival, len(p.prompt_ids), n_tokens)

    # ---- handlers ------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        p = await self._prepare(request, "completion")
        if request.headers.get(VALIDATE_ONLY_HEADER):
            return self._validated(p)
        if p.req.stream:
            return await self._stream(request, p)
        return await self._full(request, p)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        p = await self._prepare(request, "chat")
        if request.headers.get(VALIDATE_ONLY_HEADER):
            return self._validated(p)
        if p.req.stream:
            return await self._stream(request, p)
        return await self._full(request, p)

    async def _collect(self, p: Prepared, index: int) -> Choice:
        text, final, logprobs, prompt_lp = [], None, [], None
        async for out in self._generate(p, index):
            text.append(out.text)
            if out.logprobs is not None:
                logprobs.extend(out.logprobs)
            if out.prompt_logprobs is not None:
                prompt_lp = out.prompt_logprobs
            final = out
        if final is None or not final.finished:
            raise APIError("the engine ended the request without a result", 500)
        if final.finish_reason == "error":
            raise APIError(f"generation failed: {client_message(final.error or 'engine error')}", 500)
        return Choice(index, "".join(text), final, logprobs if p.req.logprobs is not None or
                      p.num_seqs > p.req.n else None, prompt_lp)

    def _echo_prefix(self, p: Prepared) -> str:
        """Chat echo: the last message's content when it is the assistant's (vLLM's rule)."""
        last = (p.req.messages or [{}])[-1]
        return last.get("content") or "" if p.req.echo and last.get("role") == "assistant" else ""

    async def _full(self, request: web.Request, p: Prepared) -> web.Response:
        try:
            async with asyncio.TaskGroup() as tg:   # a failing choice cancels (and aborts) the others
                tasks = [tg.create_task(self._collect(p, i)) for i in range(p.num_seqs)]
        except BaseExceptionGroup as eg:            # the first failure is the request's error
            first = next((e for e in eg.exceptions if isinstance(e, APIError)), eg.exceptions[0])
            raise first from None
        choices = [t.result() for t in tasks]
        if p.num_seqs > p.req.n:   # best_of: the n candidates with the highest cumulative logprob
            choices = sorted(choices, key=lambda c: c.cumulative_logprob, reverse=True)[:p.req.n]
        fmt = LogprobFormatter(self.state.tokenizer, p.req.return_tokens_as_token_ids)
        n_gen = sum(len(c.final.all_token_ids) for c in choices)
        usage = _usage(len(p.prompt_ids), n_gen)
        prompt_lp = next((c.prompt_logprobs for c in choices if c.prompt_logprobs is not None), None)
        prompt_lp_body = fmt.prompt(p.prompt_ids, prompt_lp) if prompt_lp is not None and p.req.prompt_logprobs is not None else None
        out_choices = []
        for i, c in enumerate(choices):
            want_lp = p.req.logprobs is not None
            if p.req.kind == "completion":
                text, lp = c.text, None
                if p.prompt_text is not None:
                    text = p.prompt_text + text
                if want_lp:
                    ids, entries = list(c.final.all_token_ids), list(c.logprobs or [])
                    if p.prompt_text is not None:
                        ids = p.prompt_ids + ids
                        entries = [None] + list(prompt_lp or [None] * (len(p.prompt_ids) - 1)) + entries
                    lp = fmt.completion(ids, entries)
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": c.final.finish_reason,
                          "stop_reason": c.final.stop_reason, "prompt_logprobs": prompt_lp_body}
            else:
                asm = self._assembler(p)
                asm.feed(c.text, final=True)
                calls = asm.finish()
                content = asm.message_content()
                if self._echo_prefix(p):
                    content = self._echo_prefix(p) + (content or "")
                message = {"role": "assistant", "content": content, "refusal": None,
                           "annotations": None, "audio": None, "function_call": None, "tool_calls": calls}
                message.update(self._reasoning_fields(asm.reasoning if asm.reasoning_active else None, p))
                choice = {"index": i, "message": message,
                          "logprobs": fmt.chat(c.final.all_token_ids, c.logprobs or []) if want_lp else None,
                          "finish_reason": asm.finish_reason(c.final.finish_reason), "stop_reason": c.final.stop_reason}
            if p.req.return_token_ids:
                choice["token_ids"] = list(c.final.all_token_ids)
            out_choices.append(choice)
        final = choices[0].final
        body = {"id": p.request_id, "object": "text_completion" if p.req.kind == "completion" else "chat.completion",
                "created": p.created, "model": p.model, "choices": out_choices, "usage": usage}
        if p.req.kind == "chat":
            body["prompt_logprobs"] = prompt_lp_body
        if p.req.return_token_ids:
            body["prompt_token_ids"] = list(p.prompt_ids)
        body.update({"system_fingerprint": None, "service_tier": None, "kv_transfer_params": final.kv_transfer_params})
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
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": p.request_id, "object": obj, "created": p.created, "model": p.model}
        n_prompt = len(p.prompt_ids)
        continuous = p.req.include_usage and p.req.continuous_usage_stats
        fmt = LogprobFormatter(self.state.tokenizer, p.req.return_tokens_as_token_ids)
        k = p.req.n
        n_out = [0] * k
        offsets = [0] * k           # completions: where the next token starts in the choice's text
        asms = [self._assembler(p) for _ in range(k)] if chat else []

        def chunk(i: int, out: TextOutput | None, text: str | dict | None, role: bool = False,
                  ids: list[int] | None = None, entries: list | None = None, finish_override: str | None = None) -> bytes:
            finish = out.finish_reason if out is not None and out.finished else None
            stop_reason = out.stop_reason if out is not None and out.finished else None
            lp = None
            if p.req.logprobs is not None and ids is not None and entries is not None:
                if chat:
                    lp = fmt.chat(ids, entries)
                else:
                    lp = fmt.completion(ids, entries, offsets[i])
                    offsets[i] += sum(len(fmt.token(t)) for t in ids)
            if chat:
                if role:
                    delta: dict[str, Any] = {"role": "assistant", "content": text or ""}
                else:
                    delta = text if isinstance(text, dict) else {"content": text}
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish_override or finish}
                if finish is not None:
                    choice["stop_reason"] = stop_reason
            else:
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish, "stop_reason": stop_reason}
            if p.req.return_token_ids and ids is not None:
                choice["token_ids"] = list(ids)
            c = {**head, "choices": [choice]}
            if continuous:
                c["usage"] = _usage(n_prompt, sum(n_out))
            return sse(c)

        gens = [self._generate(p, i) for i in range(k)]

        async def first_of(g):
            try:
                return await g.__anext__()
            except StopAsyncIteration:
                return None

        # Pull each choice's first output before committing to a 200 stream, so an engine rejection is a plain 400.
        try:
            firsts = await asyncio.gather(*(first_of(g) for g in gens))
        except BaseException:
            for g in gens:
                await g.aclose()
            raise
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, "X-Request-Id": p.base_id})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            out = firsts[i]
            try:
                while out is not None:
                    await queue.put((i, out))
                    if out.finished:
                        break
                    out = await first_of(gens[i])
            except BaseException as e:  # handed to the writer
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        pumps = [asyncio.create_task(pump(i)) for i in range(k)]
        try:
            for i in range(k):
                if chat:
                    await resp.write(chunk(i, None, self._echo_prefix(p), role=True))
            open_ = k
            finished = 0
            started = [False] * k
            failed = False
            while open_:
                i, out = await queue.get()
                if out is None:
                    open_ -= 1
                    continue
                if isinstance(out, BaseException):
                    raise out
                n_out[i] = len(out.all_token_ids)
                if out.finished and out.finish_reason == "error":
                    await resp.write(sse(APIError(f"generation failed: {client_message(out.error or 'engine error')}",
                                                  500).body()))
                    failed = True
                    break
                text, ids, entries = out.text, out.token_ids, out.logprobs
                if not started[i] and p.prompt_text is not None:     # completions echo
                    text = p.prompt_text + text
                    if entries is not None:
                        pl = out.prompt_logprobs or [None] * (n_prompt - 1)
                        ids, entries = p.prompt_ids + list(ids), [None] + list(pl) + list(entries)
                started[i] = True
                wants_ids = bool(ids) and (p.req.logprobs is not None or p.req.return_token_ids)
                if chat:
                    d = asms[i].feed(out.text, final=out.finished)
                    finish = None
                    if out.finished:
                        asms[i].finish()
                        finish = asms[i].finish_reason(out.finish_reason)
                    if not d.empty() or out.finished or wants_ids:
                        await resp.write(chunk(i, out, self._delta(d, p), ids=ids, entries=entries,
                                               finish_override=finish))
                elif text or out.finished or wants_ids:
                    await resp.write(chunk(i, out, text, ids=ids, entries=entries))
                if out.finished:
                    finished += 1
            if not failed and finished == k and p.req.include_usage:
                await resp.write(sse({**head, "choices": [], "usage": _usage(n_prompt, sum(n_out))}))
        except APIError as e:
            await resp.write(sse(e.body()))
        except self.state.engine_errors as e:
            await resp.write(sse(APIError(f"engine failed: {client_message(str(e))}", 503).body()))
        finally:
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for g in gens:
                await g.aclose()
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
