"""One benchmarked request, as measured on the client. All times are time.perf_counter() seconds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RequestRecord:
    stage_id: int
    scheduled_time: float
    start_time: float
    end_time: float
    request_data: str  # the JSON body sent
    streamed: bool
    input_tokens: int = 0  # server usage.prompt_tokens when given, else the client's count
    output_tokens: int = 0  # client count of the whole output text
    server_usage: Optional[dict[str, Any]] = None
    response_data: Optional[str] = None  # raw body (the SSE text for streams)
    chunk_times: list[float] = field(default_factory=list)  # one per chunk that carried text
    chunk_texts: list[str] = field(default_factory=list)  # 1:1 with chunk_times
    response_chunks: list[str] = field(default_factory=list)  # raw JSON of those chunks
    output_text: str = ""
    error_type: Optional[str] = None
    error_msg: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error_type is None
