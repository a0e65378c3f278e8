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

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
