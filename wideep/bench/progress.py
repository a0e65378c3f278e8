"""Live progress of a benchmark (done / in flight / failures / output tokens per second) with rich.

Shown only on a terminal; `--no-progress` or a non-TTY stdout gets one plain line per stage.
"""
from __future__ import annotations

import sys
import time
from typing import Optional

from .records import RequestRecord


class Counters:
    """What the display shows; also a plain ProgressSink for tests and non-TTY runs."""

    def __init__(self):
        self.stage = ""
        self.total: Optional[int] = None
        self.done = self.in_flight = self.failures = 0
        self.output_tokens = 0
        self.started_at = time.perf_counter()

    def stage_started(self, stage_id: int, description: str, total: Optional[int]) -> None:
        self.stage, self.total = description, total
        self.done = self.failures = self.output_tokens = 0
        self.started_at = time.perf_counter()

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self, rec: RequestRecord) -> None:
        self.in_flight -= 1
        self.done += 1
        if rec.ok:
            self.output_tokens += rec.output_tokens
        else:
            self.failures += 1

    def tokens_per_sec(self) -> float:
        dt = time.perf_counter() - self.started_at
        return self.output_tokens / dt if dt > 0 else 0.0

    def line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        return (f"{self.stage}: done {self.done}{total}, in flight {self.in_flight}, failures {self.failures}, "
                f"{self.tokens_per_sec():,.0f} output tok/s")


class LiveProgress(Counters):
    """Counters drawn as a rich panel, refreshed a few times a second."""

    def __init__(self):
        super().__init__()
        from rich.console import Console
        from rich.live import Live

        self._live = Live(self._render(), console=Console(), refresh_per_second=4, get_renderable=self._render)

    def _render(self):
        from rich.table import Table

        t = Table.grid(padding=(0, 2))
        t.add_row("[bold]" + (self.stage or "starting"), "")
        total = f" / {self.total}" if self.total else ""
        t.add_row("done", f"{self.done}{total}")
        t.add_row("in flight", str(self.in_flight))
        t.add_row("failures", f"[red]{self.failures}" if self.failures else "0")
        t.add_row("output tokens/s", f"{self.tokens_per_sec():,.0f}")
        return t

    def __enter__(self):
        self._live.__enter__()
        return self

    def __exit__(self, *exc):
        return self._live.__exit__(*exc)


class PlainProgress(Counters):
    def stage_started(self, stage_id, description, total):
        if self.stage:
            print(self.line(), flush=True)
        super().stage_started(stage_id, description, total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.stage:
            print(self.line(), flush=True)
        return False


def make_progress(enabled: bool):
    if enabled and sys.stdout.isatty():
        return LiveProgress()
    return PlainProgress()
