"""Offline batch generation: `LLM(model_dir, **engine_args).generate(prompts, sampling_params)`.

One rank runs an EngineCore in this process. With data_parallel_size > 1 the work is handed to
wideep.engine.dp.generate_dp, which runs one engine per rank in lockstep.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

from wideep.engine.api import EngineRequest, InvalidRequest, RequestOutput, SamplingParams
from wideep.engine.config import EngineArgs
from wideep.engine.output_processor import OutputProcessor

PromptLike = str | list[int] | dict[str, Any]


@dataclass
class GenerationOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def outputs(self) -> list["GenerationOutput"]:
        """vLLM-style access (`out.outputs[0].text`)."""
        return [self]


class LLM:
    def __init__(self, model: str, **engine_args: Any):
        self.args = EngineArgs(model=str(model), **engine_args)
        from wideep.model.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(self.args.model)
        self.core = None
        if self.args.data_parallel_size <= 1:
            from wideep.engine.core import EngineCore
            self.core = EngineCore(self.args)
        self._ids = itertools.count()

    # ---- prompts ---------------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptLike) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequest("prompt must be a string, a list of token ids, or a dict with "
                             "'prompt' or 'prompt_token_ids'", "prompt")

    def generate(self, prompts: PromptLike | Sequence[PromptLike],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest(f"got {len(params)} sampling_params for {len(prompts)} prompts", "sampling_params")

        results: list[GenerationOutput] = []
        requests: list[EngineRequest] = []
        for prompt, sp in zip(prompts, params):
            text, ids = self._tokenize(prompt)
            rid = f"gen-{next(self._ids)}"
            requests.append(EngineRequest(request_id=rid, prompt_token_ids=ids, sampling_params=sp))
            results.append(GenerationOutput(request_id=rid, prompt=text, prompt_token_ids=ids))

        processor = OutputProcessor(self.tokenizer)
        for r in requests:
            processor.add_request(r.request_id, r.prompt_token_ids, r.sampling_params)
        by_id = {r.request_id: r for r in results}

        def consume(out: RequestOutput) -> None:
            t = processor.process(out)
            if t is None:
                return
            res = by_id[t.request_id]
            res.text += t.text
            res.token_ids.extend(t.token_ids)
            res.num_cached_tokens = t.num_cached_tokens
            if t.finished:
                res.finish_reason, res.stop_reason = t.finish_reason, t.stop_reason

        if self.core is None:
            # Data parallel: wideep.engine.dp.generate_dp(args, requests) runs the ranks and
            # returns, per request id, the RequestOutputs in order.
            from wideep.engine.dp import generate_dp
            per_request = generate_dp(self.args, requests)
            for r in requests:
                for out in per_request[r.request_id]:
                    consume(out)
            return results

        added: list[str] = []
        try:
            for r in requests:
                self.core.add_request(r)
                added.append(r.request_id)
            while self.core.has_unfinished():
                for out in self.core.step():
                    consume(out)
                for rid in processor.take_aborts():
                    self.core.abort_request(rid)
        except BaseException:
            for rid in added:
                self.core.abort_request(rid)
            while self.core.has_unfinished():  # flush abort outputs so the engine is clean
                self.core.step()
            raise
        return results
