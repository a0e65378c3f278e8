"""Fixtures of the model tests: checkpoint variants and their transformers twins (made once per session)."""
from __future__ import annotations

import pytest
import torch

from wideep.model.attention import AttentionMetadata


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="session")
def rel_err():
    return _rel_err


@pytest.fixture(scope="session")
def variant_dir(tmp_path_factory):
    """variant_dir(name) -> a tiny checkpoint with overrides: 'no_q_lora', 'dense2', 'fp8', 'bf16'."""
    from wideep.model.make_model import make_model

    made = {}
    overrides = {
        "no_q_lora": dict(q_lora_rank=None),
        "dense2": dict(first_k_dense_replace=2),
        "fp8": dict(fp8=True, seed=7),
        "fp8_dense": dict(fp8=True, seed=7, first_k_dense_replace=4),
        "fp8_no_q_lora": dict(fp8=True, seed=7, q_lora_rank=None),
        "bf16": dict(seed=7),
    }

    def get(name: str):
        if name not in made:
            made[name] = make_model("tiny", tmp_path_factory.mktemp(f"tiny-{name}"), **overrides[name])
        return made[name]

    return get


def hf_model(path):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def paged_runner():
    """The PagedRunner class (drives the model like an engine)."""
    return PagedRunner


@pytest.fixture(scope="session")
def hf_logits():
    """hf_logits(path, ids) -> transformers' logits [len(ids), vocab] in float32."""

    @torch.no_grad()
    def run(path, ids):
        return hf_model(path)(torch.tensor([list(ids)])).logits[0]

    return run


class PagedRunner:
    def __init__(self, model, block_size: int = 4, num_blocks: int = 64, fill: float = float("nan")):
        self.model = model
        self.block_size = block_size
        # NaN-filled: any read of a slot that was never written poisons the result
        self.caches = [
            torch.full((num_blocks, block_size, model.kv_cache_dim), fill) for _ in range(model.num_layers)
        ]
        self.free = list(range(num_blocks))  # pop() hands out high block ids first: tables are non-trivial
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def _ensure_blocks(self, seq: int, new_len: int) -> list[int]:
        table = self.tables.setdefault(seq, [])
        while len(table) * self.block_size < new_len:
            table.append(self.free.pop())
        return table

    @torch.no_grad()
    def step(self, chunks: list[tuple[int, list[int]]], num_decodes: int = 0) -> list[torch.Tensor]:
        """chunks: (seq id, new token ids), decodes first. Returns each chunk's logits [n, vocab]."""
        ids, pos, qlens, slens, tables = [], [], [], [], []
        for seq, toks in chunks:
            start = self.lens.get(seq, 0)
            end = start + len(toks)
            tables.append(list(self._ensure_blocks(seq, end)))
            ids += toks
            pos += list(range(start, end))
            qlens.append(len(toks))
            slens.append(end)
            self.lens[seq] = end
        attn = AttentionMetadata.build(qlens, slens, tables, self.block_size, num_decodes=num_decodes)
        hidden = self.model(torch.tensor(ids), torch.tensor(pos), attn, self.caches)
        logits = self.model.compute_logits(hidden)
        return list(logits.split(qlens))
