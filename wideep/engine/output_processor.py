"""Token ids -> text, and stop strings: the frontend's half of a request (the offline LLM and the
HTTP server both use it).

Stop strings are matched on the detokenized text: the text is cut before the stop string (or after
it with include_stop_str_in_output), the request finishes with finish_reason "stop" and
stop_reason = the string, and the caller must abort the request in the engine (`to_abort`).
While streaming, the last len(longest stop)-1 characters are held back, since they could be the
beginning of a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wideep.engine.api import RequestOutput, SamplingParams


@dataclass
class TextOutput:
    """One request's news as text: deltas since the last TextOutput plus the totals so far."""

    request_id: str
    text: str                           # new text since the last output
    token_ids: list[int]                # new token ids since the last output
    full_text: str = ""                 # all text so far (after stop-string trimming)
    all_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    error: str | None = None
    logprobs: list[list[Any]] | None = None          # aligned with token_ids (RequestOutput.logprobs)
    prompt_logprobs: list[list[Any]] | None = None   # once (RequestOutput.prompt_logprobs)


class _RequestState:
    def __init__(self, detokenizer, params: SamplingParams):
        self.detok = detokenizer
        self.params = params
        self.text = ""             # all generated text (trimmed once a stop string hits)
        self.emitted = 0           # characters of self.text already returned
        self.token_ids: list[int] = []
        self.finished = False
        self.holdback = max((len(s) for s in params.stop), default=1) - 1


class OutputProcessor:
    def __init__(self, tokenizer):
        """`tokenizer`: wideep.model.tokenizer.Tokenizer (anything with `incremental_detokenizer`)."""
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self.to_abort: list[str] = []

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    skip_special_tokens: bool = True) -> None:
        detok = make_detokenizer(self.tokenizer, prompt_token_ids, skip_special_tokens)
        self.states[request_id] = _RequestState(detok, params)

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def take_aborts(self) -> list[str]:
        ids, self.to_abort = self.to_abort, []
        return ids

    def process(self, out: RequestOutput) -> TextOutput | None:
        """None when the request is unknown or already finished here (e.g. output after a stop string)."""
        st = self.states.get(out.request_id)
        if st is None or st.finished:
            return None
        finish_reason, stop_reason = out.finish_reason, out.stop_reason
        new_ids = list(out.new_token_ids)
        finished = out.finished
        kept_ids: list[int] = []
        # A stop token or EOS that ended the request is not text, unless include_stop_str_in_output.
        drop_last = (out.finished and finish_reason == "stop" and not isinstance(stop_reason, str)
                     and not st.params.include_stop_str_in_output)
        for k, tok in enumerate(new_ids):
            st.token_ids.append(tok)
            kept_ids.append(tok)
            before = len(st.text)
            if not (drop_last and k == len(new_ids) - 1):
                st.text += st.detok.add(tok)
            hit = self._find_stop(st, before)
            if hit is not None:
                stop, cut = hit
                st.text = st.text[:cut]
                finish_reason, stop_reason, finished = "stop", stop, True
                if not out.finished:
                    self.to_abort.append(out.request_id)
                break
        if finished:
            if not isinstance(stop_reason, str):
                st.text += st.detok.flush()   # no stop string cut the text: emit any held-back bytes
            st.finished = True
            self.states.pop(out.request_id, None)
            visible = len(st.text)
        else:
            visible = max(st.emitted, len(st.text) - st.holdback)
        delta = st.text[st.emitted:visible]
        st.emitted = visible
        return TextOutput(
            request_id=out.request_id, text=delta, token_ids=kept_ids, full_text=st.text[:visible],
            all_token_ids=list(st.token_ids), finished=finished,
            finish_reason=finish_reason if finished else None, stop_reason=stop_reason if finished else None,
            num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
            kv_transfer_params=out.kv_transfer_params, error=out.error,
            logprobs=out.logprobs[:len(kept_ids)] if out.logprobs is not None else None,
            prompt_logprobs=out.prompt_logprobs)

    @staticmethod
    def _find_stop(st: _RequestState, before: int) -> tuple[str, int] | None:
        """The earliest stop string that ends in the text added after `before` (as vLLM checks)."""
        if not st.params.stop or len(st.token_ids) < st.params.min_tokens:
            return None   # as vLLM: stop strings count only once min_tokens are out
        lo = max(0, before - st.holdback)
        best: tuple[int, str] | None = None
        for s in st.params.stop:
            i = st.text.find(s, lo)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        return s, i + len(s) if st.params.include_stop_str_in_output else i


def make_detokenizer(tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
    """wideep.model.tokenizer.IncrementalDetokenizer: `add(ids) -> new text`, `flush() -> held-back text`."""
    return tokenizer.incremental_detokenizer(prompt_token_ids, skip_special_tokens=skip_special_tokens)
