"""The scheduler's P/D seam: what the engine asks a KV connector, with no-op defaults (a connector
overrides what its role needs, as vLLM's KVConnectorBase_V1 subclasses do). Torch-free."""
from __future__ import annotations

from typing import Any


class KVConnectorBase:
    def wants_cross_layer_kv(self) -> bool:
        """Whether the runner should allocate the cache block-major (all layers of a block contiguous,
        each layer's cache a strided view): asked once, before allocation."""
        return False

    def register_kv_caches(self, caches: list[Any]) -> None:
        """Called once the runner has allocated its paged cache."""

    def get_num_remote_tokens(self, request: Any, num_local_tokens: int) -> tuple[int, bool]:
        """(tokens beyond the local prefix-cache hit that a remote engine will provide, loads asynchronously)."""
        return 0, False

    def on_blocks_allocated(self, request: Any, num_remote_tokens: int) -> None:
        """Start pulling remote KV into request.block_ids."""

    def finished_loading(self) -> set[str]:
        """Ids of requests whose remote KV has landed since the last call."""
        return set()

    def failed_loading(self) -> dict[str, str]:
        """Request id -> error of pulls that failed and must fail their request."""
        return {}

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        """(keep the request's blocks until sent, kv_transfer_params for the final output)."""
        return False, None

    def finished_sending(self) -> set[str]:
        """Ids of held requests whose blocks may now be freed."""
        return set()

    def wakeup_fd(self) -> int | None:
        """A file descriptor that turns readable when a pull has finished (the engine loop wakes on it
        instead of polling on a timer); None: no asynchronous loads."""
        return None

    def transfer_stats(self) -> dict[str, Any]:
        """Transport counters and histograms for the engine's metrics; {} when there are none."""
        return {}
