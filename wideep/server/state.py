"""What one frontend process shares between its HTTP handlers."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from wideep.server.metrics import FrontendMetrics


@dataclass
class ChatOptions:
    """The server's OpenAI-surface settings (flags of `wideep serve`); the defaults are vLLM's."""

    reasoning_parser: Any = None             # wideep.server.reasoning.ReasoningParser (None: no parser)
    reasoning_field: str = "reasoning"       # reasoning | reasoning_content | both
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    exclude_tools_when_tool_choice_none: bool = False
    trust_request_chat_template: bool = False
    sampling_defaults: dict[str, Any] = field(default_factory=dict)   # from generation_config.json
    render_pool: Any = None                  # executor that renders chat templates off the event loop


@dataclass
class FrontendState:
    client: Any                      # wideep.engine.client.AsyncEngineClient
    tokenizer: Any                   # wideep.model.tokenizer.Tokenizer
    output_processor: Any            # wideep.engine.output_processor.OutputProcessor
    metrics: FrontendMetrics
    served_model_names: list[str]
    model_root: str                  # MODEL_DIR, reported as `root` in /v1/models
    dp_rank: int
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    engine_errors: tuple[type[BaseException], ...] = ()   # exceptions meaning "the engine is gone"
    chat: ChatOptions = field(default_factory=ChatOptions)
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: set[str] = field(default_factory=set)
    ready: bool = False
    draining: bool = False
    engine_dead_reason: str | None = None
    stall_timeout_s: float = 5.0     # no heartbeat from the engine this long: the rank is unhealthy
    step_timeout_s: float = 60.0     # one engine step running this long: the rank is unhealthy
    max_prompt_chars: int | None = None   # longer prompt text cannot fit max_model_len: 400 before tokenizing
    kv_peers: Any = None             # wideep.kv_transfer.peers.PeerAllowlist | None (None: any peer)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read. A body is parsed on the event loop (json.loads holds the GIL
        however it is called), so one larger than any prompt that fits the context could be is
        refused while it is read: 12 bytes per prompt character (a JSON-escaped surrogate pair)
        plus 1 MiB for the other fields, at most 64 MiB."""
        cap = 64 * 1024 * 1024
        if self.max_prompt_chars is None:
            return cap
        return min(cap, 12 * self.max_prompt_chars + 1024 * 1024)

    def stalled(self) -> str | None:
        """Why the engine counts as stuck, or None: silent (frozen: no heartbeat at all) or one step
        running past the step bound (e.g. waiting in a collective for a frozen peer)."""
        if self.engine_dead_reason is not None:
            return None
        silent = self.client.silent_for()
        if silent > self.stall_timeout_s:
            return (f"engine of dp rank {self.dp_rank} made no progress for {silent:.1f} s: no heartbeat "
                    f"({len(self.inflight)} requests in flight)")
        busy = self.client.step_running_for()
        if busy > self.step_timeout_s:
            return (f"engine of dp rank {self.dp_rank} made no progress for {busy:.1f} s: one step still "
                    f"running ({len(self.inflight)} requests in flight)")
        return None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
