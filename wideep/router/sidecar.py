"""The decode pod's routing sidecar (llm-d-routing-sidecar, connector nixlv2; docs/protocols.md, "P/D disaggregation").

Listener `port + i` fronts the local decode server `vllm_port + i`. A request carrying
`x-prefiller-host-port` first goes to that prefill server as a one-token, non-streamed "prefill
leg"; the prefill server answers with the `kv_transfer_params` the decode server needs to pull the
KV. The original request then goes to the local decode server with those params and its response
streams back unbuffered. Without the header the request is proxied as-is.

Pure aiohttp: the sidecar never imports torch.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from wideep.logs import ACCESS_LOG
from wideep.kv_transfer.params import PREFILL_LEG_PARAMS, VALIDATE_ONLY_HEADER
from wideep.router.headers import NOT_FORWARDED, forwardable
from wideep.utils.aio import access_logger_class
from wideep.utils.openai_errors import error_bytes, error_headers

log = logging.getLogger("wideep.sidecar")

RANK_KEY = web.AppKey("rank", int)
PREFILLER_HEADER = "x-prefiller-host-port"
PD_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class SidecarConfig:
    port: int = 8000
    vllm_port: int = 8200
    data_parallel_size: int = 1
    host: str = "0.0.0.0"
    vllm_host: str = "127.0.0.1"
    # host:port or bare host entries; None = no SSRF protection (any prefiller accepted).
    prefiller_allowlist: list[str] | None = None
    on_prefill_failure: str = "local"        # local: decode prefills itself | error: 502
    enable_prefiller_sampling: bool = False
    prefill_timeout_s: float = 600.0
    validate_timeout_s: float = 60.0         # the decode rank's check of a request before its prefill leg
    validate_before_prefill: bool = True     # needs a wideep decode server (it answers VALIDATE_ONLY_HEADER)
    seed: int | None = None                  # prefiller sampling RNG (tests)

    def __post_init__(self) -> None:
        if self.on_prefill_failure not in ("local", "error"):
            raise ValueError(f"--on-prefill-failure must be 'local' or 'error', got {self.on_prefill_failure!r}")
        if self.data_parallel_size < 1:
            raise ValueError(f"--data-parallel-size must be >= 1, got {self.data_parallel_size}")


def openai_error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_bytes(message, status, param), headers=error_headers(status))


def parse_allowlist(entries: list[str] | None) -> tuple[set[str], set[str]] | None:
    """Split allowlist entries into exact host:port pairs and bare hosts (any port)."""
    if entries is None:
        return None
    pairs, hosts = set(), set()
    for raw in entries:
        e = raw.strip().lower()
        if not e or e.startswith("#"):
            continue
        if _split_host_port(e) is not None:
            pairs.add(e)
        else:
            hosts.add(e.strip("[]"))
    return pairs, hosts


def _split_host_port(hp: str) -> tuple[str, int] | None:
    """'10.0.0.1:8000' or '[::1]:8000' → (host, port); None when there is no valid port."""
    host, sep, port = hp.rpartition(":")
    if not sep or not host or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        return None
    p = int(port)
    if not 0 < p < 65536:
        return None
    return host.strip("[]"), p


class Sidecar:
    def __init__(self, cfg: SidecarConfig):
        self.cfg = cfg
        self._allow = parse_allowlist(cfg.prefiller_allowlist)
        self._rng = random.Random(cfg.seed)
        self._session: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self.ports: list[int] = []
        # Counters a test or an operator can read at GET /sidecar/stats.
        self.stats: dict[str, int] = {"pd_requests": 0, "plain_requests": 0, "prefill_failures": 0,
                                      "local_prefill_fallbacks": 0, "rejected_prefillers": 0,
                                      "refused_before_prefill": 0}

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        if self._allow is None:
            log.warning("sidecar: no --prefiller-allowlist; x-prefiller-host-port may name any host (no SSRF protection)")
        for rank in range(self.cfg.data_parallel_size):
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app[RANK_KEY] = rank
            app.router.add_get("/sidecar/stats", self._stats)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            # handler_cancellation: a client hanging up cancels the handler, which drops the decode
            # connection (the server aborts the request) even while a non-streaming answer is pending.
            runner = web.AppRunner(app, access_log=ACCESS_LOG, access_log_class=access_logger_class(),
                                   handler_cancellation=True)
            await runner.setup()
            site = web.TCPSite(runner, self.cfg.host, self.cfg.port + rank if self.cfg.port else 0)
            await site.start()
            self._runners.append(runner)
            self.ports.append(runner.addresses[0][1])
        log.info("sidecar: listening on %s, forwarding to %s:%s+i",
                 ",".join(map(str, self.ports)), self.cfg.vllm_host, self.cfg.vllm_port)

    async def stop(self) -> None:
        for r in self._runners:
            await r.cleanup()
        self._runners.clear()
        if self._session:
            await self._session.close()
            self._session = None

    # ---------------------------------------------------------------- routing
    def _decode_base(self, rank: int) -> str:
        host = self.cfg.vllm_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.cfg.vllm_port + rank}"

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rank = request.app[RANK_KEY]
        prefiller = request.headers.get(PREFILLER_HEADER, "").strip()
        if prefiller and request.method == "POST" and request.path in PD_PATHS:
            return await self._handle_pd(request, rank, prefiller)
        self.stats["plain_requests"] += 1
        body = await request.read()
        return await self._forward(request, self._decode_base(rank) + request.path_qs, body)

    def _choose_prefiller(self, header: str) -> tuple[str | None, web.Response | None]:
        candidates = [h.strip() for h in header.split(",") if h.strip()]
        if not candidates:
            return None, openai_error(400, f"{PREFILLER_HEADER} is empty", PREFILLER_HEADER)
        for c in candidates:
            if _split_host_port(c) is None:
                return None, openai_error(400, f"{PREFILLER_HEADER} entry {c!r} is not host:port", PREFILLER_HEADER)
            if not self._allowed(c):
                self.stats["rejected_prefillers"] += 1
                log.warning("sidecar: rejected prefiller %s (not in allowlist)", c)
                return None, openai_error(
                    403, f"prefiller {c!r} named in {PREFILLER_HEADER} is not in the sidecar's allowlist",
                    PREFILLER_HEADER)
        if len(candidates) > 1 and self.cfg.enable_prefiller_sampling:
            return self._rng.choice(candidates), None
        return candidates[0], None

    def _allowed(self, host_port: str) -> bool:
        if self._allow is None:
            return True
        pairs, hosts = self._allow
        hp = host_port.lower()
        host, _ = _split_host_port(hp)  # type: ignore[misc]
        return hp in pairs or host in hosts

    async def _handle_pd(self, request: web.Request, rank: int, header: str) -> web.StreamResponse:
        prefiller, err = self._choose_prefiller(header)
        if err is not None:
            return err
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the limit
            return openai_error(400, f"request body must be a JSON object: {exc}")
        self.stats["pd_requests"] += 1
        # Decode checks the request first: one it would refuse (too long, bad parameters, decode
        # down) must not leave prefill KV held until the producer's timeout.
        refused = await self._validate_on_decode(request, rank, raw) if self.cfg.validate_before_prefill else None
        if refused is not None:
            self.stats["refused_before_prefill"] += 1
            return refused

        kv_params, failure = await self._prefill_leg(request, prefiller, body)
        if failure is not None:
            self.stats["prefill_failures"] += 1
            if isinstance(failure, web.Response):  # prefiller answered 4xx: pass its error through
                return failure
            if self.cfg.on_prefill_failure == "error":
                return openai_error(502, f"prefill on {prefiller} failed: {failure}")
            log.warning("sidecar: prefill on %s failed (%s); decode rank %d prefills locally", prefiller, failure, rank)
            self.stats["local_prefill_fallbacks"] += 1
            decode_body = dict(body)
            decode_body.pop("kv_transfer_params", None)
        else:
            decode_body = dict(body)
            decode_body["kv_transfer_params"] = kv_params
        return await self._forward(request, self._decode_base(rank) + request.path_qs,
                                   json.dumps(decode_body).encode())

    async def _validate_on_decode(self, request: web.Request, rank: int, raw: bytes) -> web.Response | None:
        """None when the decode rank would accept the request, else the answer to give the client."""
        headers = {"content-type": "application/json", VALIDATE_ONLY_HEADER: "1"}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        assert self._session is not None
        try:
            async with self._session.post(self._decode_base(rank) + request.path_qs, data=raw, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=self.cfg.validate_timeout_s)) as resp:
                if resp.status == 200:
                    await resp.read()
                    return None
                body = await resp.read()
                out = web.Response(status=resp.status, body=body,
                                   content_type=resp.content_type or "application/json")
                if resp.headers.get("Retry-After"):
                    out.headers["Retry-After"] = resp.headers["Retry-After"]
                return out
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return openai_error(503, f"decode rank {rank} is not available ({type(exc).__name__})")

    async def _prefill_leg(self, request: web.Request, prefiller: str, body: dict[str, Any]
                           ) -> tuple[dict[str, Any] | None, str | web.Response | None]:
        """Send the one-token prefill leg. Returns (params, None) or (None, why) / (None, 4xx response)."""
        leg = prefill_leg_body(body)
        leg["max_tokens"] = 1
        leg["max_completion_tokens"] = 1
        leg["kv_transfer_params"] = dict(PREFILL_LEG_PARAMS)
        headers = {"content-type": "application/json", "x-request-id": str(uuid.uuid4())}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        url = f"http://{prefiller}{request.path}"
        assert self._session is not None
        try:
            async with self._session.post(url, data=json.dumps(leg).encode(), headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=self.cfg.prefill_timeout_s)) as resp:
                text = await resp.read()
                if resp.status >= 500:
                    return None, f"HTTP {resp.status}: {text[:300].decode(errors='replace')}"
                if resp.status >= 400:
                    return None, web.Response(status=resp.status, body=text,
                                              content_type=resp.content_type or "application/json")
                try:
                    data = json.loads(text)
                except ValueError:
                    return None, "response is not JSON"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        params = data.get("kv_transfer_params") if isinstance(data, dict) else None
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            return None, "response carries no kv_transfer_params (is the prefill server a kv_producer?)"
        return params, None

    async def _forward(self, request: web.Request, url: str, body: bytes) -> web.StreamResponse:
        """Proxy to the decode server and copy its response through chunk by chunk (SSE stays live)."""
        # the body sent on may be re-encoded JSON (decode leg): it carries no content-encoding
        headers = {k: v for k, v in forwardable(request.headers.items()).items()
                   if k.lower() not in (PREFILLER_HEADER, "content-encoding")}
        assert self._session is not None
        try:
            upstream = await self._session.request(request.method, url, data=body or None, headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            return openai_error(503, f"decode rank {request.app[RANK_KEY]} is not available ({type(exc).__name__})")
        try:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in NOT_FORWARDED:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        except ConnectionResetError:   # the client hung up: an ordinary event, not an error to log
            upstream.close()
            return resp
        except BaseException:
            upstream.close()  # client went away: drop the decode connection so the server aborts the request
            raise
        finally:
            upstream.release()


# Fields that shape the output, not the prompt: the one-token prefill leg must not carry them (min_tokens
# above 1 would be a 400; n, logprobs and constraints would cost work for a token that is thrown away).
# The decode leg keeps the body as sent.
PREFILL_LEG_DROP = ("stream_options", "min_tokens", "n", "best_of", "logprobs", "top_logprobs", "prompt_logprobs",
                    "echo", "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                    "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern", "logit_bias",
                    "bad_words", "allowed_token_ids", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "stop", "stop_token_ids", "include_stop_str_in_output", "parallel_tool_calls")


def prefill_leg_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg of a P/D request: same prompt (messages, tools and template inputs are kept, so
    the prompt renders identically), output limited to one unconstrained token."""
    leg = {k: v for k, v in body.items() if k not in PREFILL_LEG_DROP}   # top level only: no deepcopy
    leg["stream"] = False
    if leg.get("tools") and (leg.get("tool_choice") == "required" or isinstance(leg.get("tool_choice"), dict)):
        leg["tool_choice"] = "none"   # tools still render into the prompt; no constraint for the thrown-away token
    return leg


async def run_sidecar(cfg: SidecarConfig, ready: asyncio.Event | None = None) -> None:
    """Runs until SIGTERM/SIGINT; then stops listening and closes upstream connections."""
    import signal

    sidecar = Sidecar(cfg)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("sidecar: shutting down")
    finally:
        await sidecar.stop()
