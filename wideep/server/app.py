"""The aiohttp application of one DP rank: routes, API-key check, X-Request-Id, OpenAI error bodies."""
from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

import wideep
from wideep.server.errors import APIError, bad_request
from wideep.server.metrics import CONTENT_TYPE
from wideep.server.protocol import check_model
from wideep.server.serving import OpenAIServing, read_json
from wideep.server.state import FrontendState

log = logging.getLogger("wideep.frontend")

STATE_KEY = web.AppKey("state", FrontendState)


def _error_response(e: APIError, request_id: str | None = None) -> web.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return web.Response(text=e.json(), status=e.status, content_type="application/json", headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return _error_response(e, request.headers.get("X-Request-Id"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {404: f"no route for {request.method} {request.path}",
               405: f"method {request.method} is not allowed on {request.path}"}.get(e.status, e.reason)
        return _error_response(APIError(msg, e.status))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - last resort: an error body, never a hang or an HTML page
        state = request.app[STATE_KEY]
        if state.engine_errors and isinstance(e, state.engine_errors):
            return _error_response(APIError(f"the engine is not available: {e}", 503))
        log.exception("unhandled error on %s", request.path)
        return _error_response(APIError(f"internal error: {type(e).__name__}: {e}", 500))


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """vLLM's --api-key: only /v1/* needs 'Authorization: Bearer <key>'."""
    key = request.app[STATE_KEY].api_key
    if key and request.path.startswith("/v1"):
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise APIError("Unauthorized: send 'Authorization: Bearer <api key>'", 401)
    return await handler(request)


@web.middleware
async def availability_middleware(request: web.Request, handler):
    """New generation work is refused while draining or after the engine died (503, not a hang)."""
    state = request.app[STATE_KEY]
    if request.method == "POST" and request.path.startswith("/v1/"):
        if state.engine_dead_reason:
            raise APIError(f"the engine process is gone: {state.engine_dead_reason}", 503)
        if state.draining:
            raise APIError("the server is shutting down", 503)
    return await handler(request)


def build_app(state: FrontendState) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware, availability_middleware],
                          client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    serving = OpenAIServing(state)

    async def health(request: web.Request) -> web.Response:
        if state.engine_dead_reason or not state.client.is_alive():
            raise APIError(f"engine dead: {state.engine_dead_reason or 'not alive'}", 503)
        return web.Response(status=200)

    async def readyz(request: web.Request) -> web.Response:
        if state.engine_dead_reason or not state.client.is_alive():
            raise APIError(f"engine dead: {state.engine_dead_reason or 'not alive'}", 503)
        if state.draining or not state.ready:
            raise APIError("not ready" if not state.ready else "draining", 503)
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "vllm",
                 "root": state.model_root, "parent": None, "max_model_len": state.max_model_len,
                 "permission": [{"id": f"modelperm-{state.dp_rank}", "object": "model_permission",
                                 "created": state.created, "allow_create_engine": False, "allow_sampling": True,
                                 "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                 "allow_fine_tuning": False, "organization": "*", "group": None,
                                 "is_blocking": False}]}
                for name in state.served_model_names]
        return web.json_response({"object": "list", "data": data})

    async def metrics(request: web.Request) -> web.Response:
        if state.client.is_alive():
            state.metrics.update_engine_stats(await state.client.stats(timeout=0.5))
        return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": wideep.__version__})

    async def tokenize(request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        check_model(body.get("model"), state.served_model_names)
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise bad_request("'add_special_tokens' must be a boolean", "add_special_tokens")
        if "messages" in body:
            from wideep.server.protocol import parse_chat

            req = parse_chat({**body, "add_special_tokens": bool(body.get("add_special_tokens", False))})
            try:
                ids = state.tokenizer.apply_chat_template(req.messages, add_generation_prompt=req.add_generation_prompt,
                                                          tokenize=True)
            except Exception as e:  # noqa: BLE001
                raise bad_request(f"chat template failed on 'messages': {e}", "messages") from None
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad_request("'prompt' must be a string (or send 'messages')", "prompt")
            ids = state.tokenizer.encode(prompt, add_special_tokens=add_special)
        token_strs = [state.tokenizer.id_to_token(t) for t in ids] if body.get("return_token_strs") else None
        return web.json_response({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                                  "token_strs": token_strs})

    async def detokenize(request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        check_model(body.get("model"), state.served_model_names)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                   0 <= t < state.vocab_size for t in tokens):
            raise bad_request(f"'tokens' must be a list of token ids in [0, {state.vocab_size})", "tokens")
        return web.json_response({"prompt": state.tokenizer.decode(tokens)})

    r = app.router
    r.add_get("/health", health)
    r.add_get("/readyz", readyz)
    r.add_get("/ping", health)
    r.add_get("/v1/models", models)
    r.add_get("/metrics", metrics)
    r.add_get("/version", version)
    r.add_post("/tokenize", tokenize)
    r.add_post("/detokenize", detokenize)
    r.add_post("/v1/completions", serving.completions)
    r.add_post("/v1/chat/completions", serving.chat)
    return app
