"""`wideep bench --stack SPEC`: bring a stack up with `wideep up -f SPEC`, benchmark it, take it down.

The stack is a subprocess: ready once its ready line ("ready at URL", whose URL becomes the
target unless --base-url is given) was printed, or --base-url was given, and the target answers
GET /v1/models; stopped with SIGTERM (then
SIGKILL after a grace period), always, even when the benchmark fails.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Optional

from wideep.errors import WideepError

URL_RE = re.compile(r"https?://[\w.\-\[\]:]+(?::\d+)?")


class StackError(WideepError, RuntimeError):
    pass


class Stack:
    def __init__(self, spec: str, base_url: Optional[str] = None, ready_timeout: float = 900.0,
                 command: Optional[list[str]] = None, extra_args: tuple[str, ...] = ()):
        """spec: a deployment spec file for `wideep up -f`, or "default" for the embedded tiny CPU stack."""
        import tempfile

        self.spec, self.base_url, self.ready_timeout = spec, base_url, ready_timeout
        self._state_dir = tempfile.mkdtemp(prefix="wideep-bench-stack-")
        self.command = command or [sys.executable, "-m", "wideep", "up", *([] if spec == "default" else ["-f", spec]),
                                   "--quiet", "--ready-timeout", str(ready_timeout),
                                   "--state-file", os.path.join(self._state_dir, "up.json"), *extra_args]
        self.proc: Optional[subprocess.Popen] = None
        self._ready = threading.Event()
        self._lines: list[str] = []

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self._lines.append(line)
            sys.stderr.write(f"[stack] {line}")
            m = URL_RE.search(line)
            if m and "ready" in line.lower():  # `wideep up`: "ready at http://HOST:PORT (router) ..."
                if not self.base_url:
                    self.base_url = m.group(0).rstrip("/")
                self._ready.set()

    def _answers(self) -> bool:
        if not self.base_url:
            return False
        try:
            with urllib.request.urlopen(self.base_url.rstrip("/") + "/v1/models", timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def start(self) -> str:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"`{' '.join(self.command)}` exited with {self.proc.returncode} before it was ready:\n"
                                 + "".join(self._lines[-30:]))
            if (self._ready.is_set() or self.base_url) and self._answers():
                return self.base_url
            time.sleep(0.5)
        raise StackError(f"the stack was not ready within {self.ready_timeout:.0f}s")

    def stop(self, grace: float = 60.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
