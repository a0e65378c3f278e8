"""The engine's paged KV cache seen as byte regions indexed by block id (dim 0 of every tensor).

The transport moves bytes; this module turns block ids into contiguous host buffers and back.
On GPU both directions stage through pinned host memory (gather on device, one D2H copy; one H2D
copy, scatter on device), which is what a TCP transport needs and what NIXL would skip.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview on a contiguous CPU tensor's bytes (shares memory)."""
    assert t.device.type == "cpu" and t.is_contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def is_block_major(caches: list[torch.Tensor]) -> bool:
    """Whether the layers' caches are the views [:, i] of one [num_blocks, num_layers, *block] tensor
    (engine/kv_cache.py's cross-layer layout): block b of every layer is then one byte range."""
    c0 = caches[0]
    block = c0[0].numel()
    inner = torch.empty(c0.shape[1:], device="meta").stride()
    return all(c.shape == c0.shape and c.dtype == c0.dtype and c.device == c0.device
               and c.stride() == (len(caches) * block, *inner)
               and c.data_ptr() == c0.data_ptr() + i * block * c.element_size()
               and c.untyped_storage().data_ptr() == c0.untyped_storage().data_ptr()
               for i, c in enumerate(caches))


class PagedKVCaches:
    def __init__(self, caches: list[torch.Tensor]):
        if not caches:
            raise ValueError("no KV cache tensors to transfer")
        nb = caches[0].shape[0]
        for i, c in enumerate(caches):
            if c.shape[0] != nb:
                raise ValueError(f"KV cache region {i} has {c.shape[0]} blocks, region 0 has {nb}")
        self.caches = caches
        self.block_major = is_block_major(caches)
        # Copies move bytes: 1-byte float caches (fp8) as uint8 views, which every copy kernel handles.
        self._raw = [c.view(torch.uint8) if c.element_size() == 1 else c for c in caches]
        self.device = caches[0].device
        self.num_blocks = nb
        # Copies run on their own stream so they overlap the engine's compute. Safe: a held block's
        # writes finished before its request did (sampling syncs), and a pulled block is only read by
        # the engine after scatter() has synchronized this stream.
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def layout(self) -> list[dict[str, Any]]:
        return [{"shape": list(c.shape[1:]), "dtype": _dtype_name(c.dtype)} for c in self.caches]

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids {bad[:5]} out of range 0..{self.num_blocks - 1}")
        return torch.tensor(block_ids, dtype=torch.long)   # host; moved on the copy stream

    def staging(self, num_blocks: int) -> list[torch.Tensor]:
        """Host buffers for `num_blocks` blocks of every region (pinned when the cache is on GPU)."""
        pin = self.device.type == "cuda"
        return [torch.empty((num_blocks, *c.shape[1:]), dtype=c.dtype, pin_memory=pin) for c in self._raw]

    def region_nbytes(self, num_blocks: int) -> list[int]:
        return [num_blocks * c[0].numel() * c.element_size() for c in self.caches]

    def gather(self, block_ids: list[int]) -> Iterator[memoryview]:
        """The blocks of each region in turn as host bytes (producer side). On GPU every region's
        device-to-host copy is queued at once and each is yielded as soon as it lands, so the
        copies overlap the network send of the earlier regions."""
        idx = self._index(block_ids)
        if self._stream is None:
            for c in self._raw:
                yield byte_view(c.index_select(0, idx))
            return
        out = self.staging(len(block_ids))
        events = []
        with torch.cuda.stream(self._stream):
            idx = idx.to(self.device, non_blocking=True)
            for dst, c in zip(out, self._raw):
                dst.copy_(c.index_select(0, idx), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._stream)
                events.append(ev)
        for dst, ev in zip(out, events):
            ev.synchronize()
            yield byte_view(dst)

    def scatterer(self, block_ids: list[int]) -> "Scatter":
        return Scatter(self, block_ids)


class Scatter:
    """Writes received regions into the consumer's blocks one by one (on GPU: queued host-to-device
    copies that overlap the receive of the next region); finish() returns once all have landed."""

    def __init__(self, caches: PagedKVCaches, block_ids: list[int]):
        self.caches = caches
        self.host = caches.staging(len(block_ids))
        self.idx = caches._index(block_ids)
        if caches._stream is not None:
            with torch.cuda.stream(caches._stream):
                self.idx = self.idx.to(caches.device, non_blocking=True)

    def buffers(self) -> list[memoryview]:
        return [byte_view(t) for t in self.host]

    def region(self, i: int) -> None:
        c, src = self.caches._raw[i], self.host[i]
        if self.caches._stream is None:
            c.index_copy_(0, self.idx, src)
            return
        with torch.cuda.stream(self.caches._stream):
            c.index_copy_(0, self.idx, src.to(self.caches.device, non_blocking=True))

    def finish(self) -> None:
        if self.caches._stream is not None:
            self.caches._stream.synchronize()
