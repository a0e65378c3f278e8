"""Data producers: token ids for the request, and the router's own in-flight load per endpoint."""
from __future__ import annotations

from dataclasses import dataclass, field

from wideep.router.framework import DataProducer, PreRequest, ResponseHooks
from wideep.router.registry import PluginParams, register
from wideep.router.tokenize import LocalTokenizer, RemoteTokenizer, estimate_token_ids
from wideep.router.types import Endpoint, StateKey


@dataclass
class TokenProducerParams(PluginParams):
    mode: str = ""                  # estimate | tokenizer | vllm ("" = vllm when a `vllm` mapping is given)
    tokenizer: str = ""             # directory with tokenizer.json (mode tokenizer)
    vllm: dict = field(default_factory=dict)   # {url: "http://host:port" ("" = a candidate endpoint), timeoutMs}

    def validate(self):
        bad = set(self.vllm) - {"url", "timeoutMs"}
        if bad:
            raise ValueError(f"vllm: unknown key(s) {sorted(bad)}; known: timeoutMs, url")
        if not self.mode:
            self.mode = "vllm" if self.vllm else "estimate"
        if self.mode not in ("estimate", "tokenizer", "vllm"):
            raise ValueError(f"mode {self.mode!r}: use estimate, tokenizer or vllm")
        if self.mode == "tokenizer" and not self.tokenizer:
            raise ValueError("mode tokenizer needs 'tokenizer: <dir with tokenizer.json>'")
        url = self.vllm.get("url", "")
        if not isinstance(url, str) or (url and not url.startswith(("http://", "https://"))):
            raise ValueError(f"vllm.url must be an http(s) URL, got {url!r}")
        t = self.vllm.get("timeoutMs", 2000)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ValueError(f"vllm.timeoutMs must be a number > 0, got {t!r}")


@register("token-producer")
class TokenProducer(DataProducer):
    """Fills req.token_ids once, before any prefix producer runs. Mode vllm asks the model server
    (its chat render endpoint, else /tokenize) so precise routing hashes the engine's own ids
    (R#1861); when that fails the request still routes, on the byte estimate."""

    Params = TokenProducerParams

    def __init__(self, name, params):
        super().__init__(name, params)
        self.local = LocalTokenizer(params.tokenizer) if params.mode == "tokenizer" else None
        self.remote = RemoteTokenizer(params.vllm.get("url", ""), params.vllm.get("timeoutMs", 2000) / 1000.0) \
            if params.mode == "vllm" else None

    async def produce_async(self, req, eps):
        if self.remote is None or req.token_ids is not None:
            return
        req.token_ids = await self.remote.token_ids(req, eps)   # None on failure: produce() estimates

    async def stop(self):
        if self.remote is not None:
            await self.remote.close()

    def produce(self, req, eps):
        if req.token_ids is not None:
            return
        chat = req.path.endswith("/chat/completions")
        if self.local is not None:
            req.token_ids = self.local.token_ids_of(req.body, chat)
        else:
            req.token_ids = estimate_token_ids(req.prompt_bytes)


@register("inflight-load-producer")
class InflightLoadProducer(PreRequest, ResponseHooks):
    """+1 request (+prompt tokens) on every chosen endpoint at PreRequest, -1 at end of response."""

    def __init__(self, name, params):
        super().__init__(name, params)
        self._key: StateKey[list[Endpoint]] = StateKey(name)   # the endpoints this request counted on

    def pre_request(self, req, result, headers):
        eps = _chosen(result)
        req.data.put(self._key, eps)
        tokens = req.num_prompt_tokens
        for e in eps:
            e.inflight_requests += 1
            e.inflight_tokens += tokens

    def on_response_body(self, req, result, chunk, end_of_stream):
        if not end_of_stream:
            return
        eps = req.data.take(self._key, [])
        tokens = req.num_prompt_tokens
        for e in eps:
            e.inflight_requests = max(0, e.inflight_requests - 1)
            e.inflight_tokens = max(0, e.inflight_tokens - tokens)


def _chosen(result):
    out = []
    for r in result.profile_results.values():
        if r is not None and r.targets:
            out.append(r.targets[0])
    return out
