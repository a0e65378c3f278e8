"""Child-process plumbing shared by the supervisor, the launcher and the benchmark's stack runner:
stop a process (SIGTERM, wait, SIGKILL), tie a child's life to its parent, and say how one ended."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Sequence


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Child side (Linux): receive `sig` when the parent exits, however it exits (PR_SET_PDEATHSIG).

    Safe as a subprocess preexec_fn; a no-op where prctl does not exist."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def describe_exit(code: int | None) -> str:
    """Popen.returncode in words: 'exited with code 1', 'killed by SIGKILL' (never 'code None')."""
    if code is None:
        return "exited (exit status unknown)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def send(pid: int, sig: int, group: bool = False) -> None:
    """Signal a process (or the process group it leads); one that is gone already is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def terminate(procs: Sequence[subprocess.Popen], grace: float, *, group: bool = False) -> None:
    """SIGTERM every process, give them `grace` seconds together, SIGKILL whatever is left and reap it.

    group=True (processes started with start_new_session): the SIGTERM still goes to the process
    alone (it decides how its children stop, e.g. drain first), the SIGKILL to its whole group, so
    its children are swept too, also when it exited already."""
    for p in procs:
        if p.poll() is None:
            send(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if group:
            send(p.pid, signal.SIGKILL, True)
        elif p.poll() is None:
            send(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


async def terminate_async(proc: asyncio.subprocess.Process, grace: float, *, group: bool = False) -> None:
    """`terminate` for an asyncio subprocess, without blocking the event loop."""
    if proc.returncode is None:
        send(proc.pid, signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
    if group:
        send(proc.pid, signal.SIGKILL, True)
    elif proc.returncode is None:
        send(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        await proc.wait()
