"""Engine logprob entries ([logprob, rank, top ids, top logprobs] per token) -> vLLM's response shapes:
chat `logprobs.content`, the completions `logprobs` object, and `prompt_logprobs`."""
from __future__ import annotations

from typing import Any


class LogprobFormatter:
    def __init__(self, tokenizer, tokens_as_ids: bool = False):
        self.tok = tokenizer
        self.as_ids = tokens_as_ids
        self._cache: dict[int, str] = {}

    def token(self, tid: int) -> str:
        if self.as_ids:
            return f"token_id:{tid}"
        s = self._cache.get(tid)
        if s is None:
            s = self._cache[tid] = self.tok.decode([tid], skip_special_tokens=False)
        return s

    def chat(self, token_ids: list[int], entries: list[list[Any]]) -> dict[str, Any]:
        content = []
        for tid, (lp, _rank, top_ids, top_lps) in zip(token_ids, entries):
            s = self.token(tid)
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                            "top_logprobs": [{"token": self.token(t), "logprob": v,
                                              "bytes": list(self.token(t).encode("utf-8"))}
                                             for t, v in zip(top_ids, top_lps)]})
        return {"content": content}

    def completion(self, token_ids: list[int], entries: list[list[Any] | None], offset: int = 0) -> dict[str, Any]:
        """`entries[i]` None: no logprob (the prompt's first token under echo). `offset`: where the
        first token starts in the choice's text (streamed chunks continue the count)."""
        out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for tid, e in zip(token_ids, entries):
            s = self.token(tid)
            out["text_offset"].append(offset)
            offset += len(s)
            out["tokens"].append(s)
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp, _rank, top_ids, top_lps = e
            out["token_logprobs"].append(lp)
            top = {s: lp}   # as vLLM: the chosen token is always among them
            for t, v in zip(top_ids, top_lps):
                top.setdefault(self.token(t), v)
            out["top_logprobs"].append(top)
        return out

    def prompt(self, prompt_ids: list[int], entries: list[list[Any]]) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: None for the first token, then {token id: {logprob, rank, decoded_token}}."""
        out: list[dict[str, Any] | None] = [None]
        for tid, (lp, rank, top_ids, top_lps) in zip(prompt_ids[1:], entries):
            d = {str(tid): {"logprob": lp, "rank": rank, "decoded_token": self.token(tid)}}
            for r, (t, v) in enumerate(zip(top_ids, top_lps), 1):
                d.setdefault(str(t), {"logprob": v, "rank": r, "decoded_token": self.token(t)})
            out.append(d)
        return out
