"""Run one function per rank in its own process and bring back each rank's result, or a clear error.

Used by the offline multi-rank LLM, the EP benchmark and the tests: spawn (never fork: CUDA and
gloo state do not survive fork), a deadline on the whole run, and every child killed on the way
out, whatever happened, so a dead or hung rank never leaves the caller waiting.
"""
from __future__ import annotations

import os
import queue
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """One or more ranks raised, died or ran past the deadline."""


def _entry(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any,
           env: dict[str, str], threads: int) -> None:
    os.environ.update(env)
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        out = fn(rank, world_size, port, *args)
        results.put(("ok", rank, out))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        results.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1)
    finally:
        # Do not let a hung collective teardown keep the process alive after it reported.
        results.close()
        results.join_thread()
        os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 300.0,
              env: dict[str, str] | None = None, threads_per_rank: int = 1, port: int | None = None,
              on_start: Callable[[list[Any]], None] | None = None) -> list[Any]:
    """Call fn(rank, world_size, port, *args) in `world_size` processes; return results in rank order.

    `port` is a free TCP port for tcp:// rendezvous (picked here when None). Raises RankFailed naming
    the failing rank(s) with their traceback, or the ranks still running at the deadline.
    """
    from wideep.utils.net import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = port or free_port()
    procs = [ctx.Process(target=_entry, daemon=True, name=f"wideep-rank{r}",
                         args=(fn, r, world_size, port, args, results, dict(env or {}), threads_per_rank))
             for r in range(world_size)]
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        if on_start:
            on_start(procs)
        while len(outputs) + len(errors) < world_size:
            try:
                kind, rank, payload = results.get(timeout=0.5)
                (outputs if kind == "ok" else errors)[rank] = payload
                if errors:
                    # give the others a moment to report their own error (the root cause may be elsewhere)
                    deadline = min(deadline, time.monotonic() + 5.0)
                continue
            except queue.Empty:
                pass
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in outputs and r not in errors and not p.is_alive():
                    # a last look: the result may be in flight
                    try:
                        while True:
                            kind, rank, payload = results.get(timeout=0.5)
                            (outputs if kind == "ok" else errors)[rank] = payload
                    except queue.Empty:
                        pass
                    if r not in outputs and r not in errors:
                        errors[r] = f"process exited with code {p.exitcode} without reporting a result"
                        deadline = min(deadline, now + 5.0)
            if now > deadline:
                missing = [r for r in range(world_size) if r not in outputs and r not in errors]
                for r in missing:
                    errors[r] = f"still running after the deadline ({timeout_s:.0f}s run timeout)"
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        results.close()
    if errors:
        first = min(errors)
        lines = [f"rank {r}: {msg.splitlines()[0]}" for r, msg in sorted(errors.items())]
        raise RankFailed(f"{len(errors)} of {world_size} rank(s) failed:\n  " + "\n  ".join(lines)
                         + f"\n--- rank {first} detail ---\n{errors[first]}")
    return [outputs[r] for r in range(world_size)]
