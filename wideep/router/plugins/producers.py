"""Data producers: token ids for the request, and the router's own in-flight load per endpoint."""
from __future__ import annotations

from dataclasses import dataclass

from wideep.router.framework import DataProducer, PreRequest, ResponseHooks
from wideep.router.registry import register
from wideep.router.tokenize import LocalTokenizer, estimate_token_ids


@dataclass
class TokenProducerParams:
    mode: str = "estimate"          # estimate | tokenizer
    tokenizer: str = ""             # directory with tokenizer.json (mode tokenizer)

    def validate(self):
        if self.mode not in ("estimate", "tokenizer"):
            raise ValueError(f"mode {self.mode!r}: use estimate or tokenizer")
        if self.mode == "tokenizer" and not self.tokenizer:
            raise ValueError("mode tokenizer needs 'tokenizer: <dir with tokenizer.json>'")


@register("token-producer")
class TokenProducer(DataProducer):
    """Fills req.token_ids once, before any prefix producer runs."""

    Params = TokenProducerParams

    def __init__(self, name, params):
        super().__init__(name, params)
        self.local = LocalTokenizer(params.tokenizer) if params.mode == "tokenizer" else None

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

    def pre_request(self, req, result, headers):
        eps = _chosen(result)
        req.data[self.name] = eps
        tokens = req.num_prompt_tokens
        for e in eps:
            e.inflight_requests += 1
            e.inflight_tokens += tokens

    def on_response_body(self, req, result, chunk, end_of_stream):
        if not end_of_stream:
            return
        eps = req.data.pop(self.name, [])
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
