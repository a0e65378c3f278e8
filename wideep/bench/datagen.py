"""Prompt generators: random (random vocabulary ids, decoded), synthetic (slices of a corpus) and
shared_prefix (groups of prompts sharing a system prompt). Each yields an endless stream of
`Prompt`s whose token lengths follow the configured distributions exactly, as inference-perf's do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from .config import BenchConfig, ConfigError, Distribution
from .tokenizer import BenchTokenizer


@dataclass
class Prompt:
    text: str
    max_tokens: int
    system: Optional[str] = None  # shared_prefix on the chat API: the shared part as a system message


def generate_lengths(dist: Distribution, count: int, rng: np.random.Generator) -> np.ndarray:
    """Integer lengths for the random/synthetic generators (inference-perf's generate_distribution)."""
    if dist.type == "fixed":
        return np.full(count, int(dist.mean), dtype=int)
    if dist.type == "uniform":
        x = rng.uniform(low=dist.min, high=dist.max, size=count)
    elif dist.type == "lognormal":
        shifted = dist.mean - dist.min if dist.mean > dist.min else 1.0
        s2 = np.log(1 + (dist.std_dev / shifted) ** 2)
        x = rng.lognormal(mean=np.log(shifted) - s2 / 2, sigma=np.sqrt(s2), size=count) + dist.min
    elif dist.type == "normal":
        if not dist.min <= dist.mean <= dist.max:
            raise ConfigError(f"distribution mean {dist.mean} lies outside [{dist.min}, {dist.max}]")
        x = rng.normal(loc=dist.mean, scale=dist.std_dev, size=count)
    else:
        return sample_distribution(dist, count, rng)
    return np.clip(np.round(np.clip(x, dist.min, dist.max)).astype(int), dist.min, dist.max)


def sample_distribution(dist: Distribution, count: int, rng: np.random.Generator) -> np.ndarray:
    """Integer samples for shared_prefix lengths (inference-perf's sample_from_distribution)."""
    if dist.type == "fixed":
        return np.full(count, int(dist.mean), dtype=int)
    if dist.type == "normal":
        x = rng.normal(dist.mean, dist.std_dev, count)
    elif dist.type == "skew_normal":
        delta = dist.skew / np.sqrt(1 + dist.skew ** 2)
        u0, v = rng.standard_normal(count), rng.standard_normal(count)
        u1 = delta * u0 + np.sqrt(1 - delta ** 2) * v
        x = dist.mean + dist.std_dev * np.where(u0 >= 0, u1, -u1)
    elif dist.type == "lognormal":
        if dist.std_dev <= 0:
            x = np.full(count, dist.mean, dtype=float)
        else:
            s2 = np.log(1 + (dist.std_dev / dist.mean) ** 2)
            x = rng.lognormal(np.log(dist.mean) - s2 / 2, np.sqrt(s2), count)
    elif dist.type == "uniform":
        x = rng.uniform(dist.min, dist.max + 1, count)
    elif dist.type == "poisson":
        x = rng.poisson(dist.mean if dist.mean > 0 else 1.0, count).astype(float)
    else:
        raise ConfigError(f"unsupported distribution type {dist.type!r}")
    return np.clip(np.round(np.clip(x, dist.min, dist.max)).astype(int), dist.min, dist.max)


def _as_distribution(value: Union[int, Distribution]) -> Distribution:
    if isinstance(value, Distribution):
        return value
    return Distribution(min=int(value), max=int(value), mean=int(value), std_dev=0, type="fixed")


class ExactLength:
    """Text that tokenizes to exactly N tokens: decode ids, re-count, add or trim ids, repeat."""

    def __init__(self, tok: BenchTokenizer, rng: np.random.Generator):
        self.tok, self.rng = tok, rng
        self.valid = np.asarray(tok.valid_ids, dtype=np.int64)

    def random_ids(self, n: int) -> list[int]:
        return self.rng.choice(self.valid, size=n).tolist() if n > 0 else []

    def converge(self, target: int, ids: list[int], extend: Callable[[int], list[int]] | None = None) -> tuple[str, list[int]]:
        if target <= 0:
            return "", []
        extend = extend or self.random_ids
        last = -1
        for _ in range(20):
            text = self.tok.decode(ids)
            n = self.tok.count_tokens(text)
            if n == target:
                return text, ids
            last = n
            if n < target:
                ids = ids + extend(target - n)
            else:
                diff = n - target
                ids = ids[:-diff] if diff < len(ids) else []
        raise ConfigError(
            f"could not build a prompt of exactly {target} tokens (got {last}); does the tokenizer match the server's model?"
        )

    def random_text(self, target: int) -> tuple[str, list[int]]:
        return self.converge(target, self.random_ids(target))


def _request_count(cfg: BenchConfig) -> int:
    n = 0
    for st in cfg.load.stages:
        n = max(n, st.num_requests or int((st.rate or 0) * (st.duration or 0)))
    return n + 1


class RandomData:
    """data.type random: prompts of random vocabulary ids, one input/output length per request."""

    def __init__(self, cfg: BenchConfig, tok: BenchTokenizer, seed: int | None):
        self.rng = np.random.default_rng(seed)
        count = max(_request_count(cfg), cfg.data.input_distribution.total_count or 0)
        self.inputs = generate_lengths(cfg.data.input_distribution, count, self.rng)
        self.outputs = generate_lengths(cfg.data.output_distribution, count, self.rng)
        self.text = ExactLength(tok, self.rng)

    def prompts(self) -> Iterator[Prompt]:
        i = 0
        while True:
            n = i % min(len(self.inputs), len(self.outputs))
            yield Prompt(self.text.random_text(int(self.inputs[n]))[0], int(self.outputs[n]))
            i += 1


# wideep's own corpus for data.type synthetic (inference-perf ships a different text; pass
# data.corpus_file_path to use any file).
_CORPUS = (
    "Wide expert parallelism spreads the experts of a mixture of experts model over many devices, "
    "so that each device keeps only a slice of the expert weights and the memory it saves holds the "
    "key and value cache of many more concurrent requests. Tokens travel to the devices that own "
    "their chosen experts and come back after the expert computation, once for every layer of the "
    "network. Prefill and decode run on separate groups of servers because their costs differ: "
    "prefill is bound by arithmetic, decode by memory bandwidth and by the latency of the exchange. "
    "A router in front of the servers reads their queues, their cache usage and the prefixes they "
    "already hold, and sends every request to the server where it will finish soonest. "
)


class SyntheticData:
    """data.type synthetic: consecutive slices of a corpus, cut to the exact token lengths."""

    def __init__(self, cfg: BenchConfig, tok: BenchTokenizer, seed: int | None):
        self.rng = np.random.default_rng(seed)
        count = max(_request_count(cfg), cfg.data.input_distribution.total_count or 0)
        self.inputs = generate_lengths(cfg.data.input_distribution, count, self.rng)
        self.outputs = generate_lengths(cfg.data.output_distribution, count, self.rng)
        corpus = Path(cfg.data.corpus_file_path).read_text() if cfg.data.corpus_file_path else _CORPUS
        self.ids = tok.encode(corpus)
        if not self.ids:
            raise ConfigError("data.corpus_file_path: the corpus tokenizes to nothing")
        self.text = ExactLength(tok, self.rng)
        self.offset = 0

    def _slice(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            take = min(n - len(out), len(self.ids) - self.offset)
            out += self.ids[self.offset:self.offset + take]
            self.offset = (self.offset + take) % len(self.ids)
        return out

    def prompts(self) -> Iterator[Prompt]:
        i = 0
        while True:
            n = i % min(len(self.inputs), len(self.outputs))
            target = int(self.inputs[n])
            yield Prompt(self.text.converge(target, self._slice(target), self._slice)[0], int(self.outputs[n]))
            i += 1


class SharedPrefixData:
    """data.type shared_prefix: num_groups system prompts, each followed by its own questions."""

    def __init__(self, cfg: BenchConfig, tok: BenchTokenizer, seed: int | None):
        sp = cfg.data.shared_prefix
        self.chat = cfg.api.type == "chat"
        rng = np.random.default_rng(sp.seed)
        text = ExactLength(tok, rng)
        q_dist = sp.question_distribution or _as_distribution(sp.question_len)
        o_dist = sp.output_distribution or _as_distribution(sp.output_len)
        sys_lens = sample_distribution(_as_distribution(sp.system_prompt_len), sp.num_groups, rng)
        q_lens = [sample_distribution(q_dist, sp.num_prompts_per_group, rng) for _ in range(sp.num_groups)]
        o_lens = [sample_distribution(o_dist, sp.num_prompts_per_group, rng) for _ in range(sp.num_groups)]
        items: list[Prompt] = []
        for g in range(sp.num_groups):
            prefix, prefix_ids = text.random_text(int(sys_lens[g]))
            for p in range(sp.num_prompts_per_group):
                _, q_ids = text.random_text(int(q_lens[g][p]))
                question = tok.decode(q_ids)
                full = tok.decode(prefix_ids + q_ids)
                items.append(Prompt(question if self.chat else full, int(o_lens[g][p]), prefix if self.chat else None))
        order = rng.permutation(len(items))
        self.items = [items[i] for i in order]

    def prompts(self) -> Iterator[Prompt]:
        i = 0
        while True:
            yield self.items[i % len(self.items)]
            i += 1


class MockData:
    """data.type mock: a fixed short prompt (a smoke test, as in inference-perf)."""

    def __init__(self, cfg: BenchConfig, tok: BenchTokenizer | None, seed: int | None):
        pass

    def prompts(self) -> Iterator[Prompt]:
        while True:
            yield Prompt("text", 50)


GENERATORS = {"random": RandomData, "synthetic": SyntheticData, "shared_prefix": SharedPrefixData, "mock": MockData}


def make_datagen(cfg: BenchConfig, tok: BenchTokenizer | None, seed: int | None):
    if cfg.data.type != "mock" and tok is None:
        raise ConfigError(f"data.type {cfg.data.type!r} needs a tokenizer (tokenizer.pretrained_model_name_or_path or --tokenizer)")
    return GENERATORS[cfg.data.type](cfg, tok, seed)
