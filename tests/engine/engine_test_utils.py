"""Helpers shared by the engine tests (a plain module: tests/ has no packages)."""
from __future__ import annotations

import random

from wideep.engine.api import EngineRequest, SamplingParams


def random_prompts(n: int, lengths: list[int] | range, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = list(lengths)
    return [[rng.randrange(2, 4096) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def run(core, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], prefix: str = "r"):
    """Runs prompts to completion; returns {index: (token_ids, finish_reason, stop_reason, num_cached)}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core.add_request(EngineRequest(f"{prefix}{i}", p, sp))
    toks: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done: dict[int, tuple] = {}
    steps = 0
    while core.has_unfinished():
        steps += 1
        assert steps < 10_000
        for out in core.step():
            i = int(out.request_id[len(prefix):])
            toks[i].extend(out.new_token_ids)
            if out.finished:
                done[i] = (toks[i], out.finish_reason, out.stop_reason, out.num_cached_tokens)
    assert len(done) == len(prompts)
    return done
