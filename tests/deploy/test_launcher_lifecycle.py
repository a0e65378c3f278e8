"""The launcher's lifecycle with stand-in processes (no model): a group that keeps failing is given up
while the healthy group and the router keep running, and a stop drains the model servers before the
router (each process records when it got SIGTERM)."""
from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

from wideep.deploy.defaults import default_spec_path
from wideep.deploy.launcher import Launcher
from wideep.deploy.plan import GroupPlan, ProcPlan, StackPlan
from wideep.deploy.spec import load_spec
from wideep.utils.net import free_port

# A stand-in pod: answers /health on its port; records its SIGTERM and drains briefly; with a
# lifetime it exits 3 after that many seconds (a crash once it was ready).
STANDIN = ("import http.server, os, signal, sys, threading, time\n"
           "log, name, port, life = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])\n"
           "class H(http.server.BaseHTTPRequestHandler):\n"
           "    def do_GET(self):\n"
           "        self.send_response(200); self.end_headers()\n"
           "    def log_message(self, *a): pass\n"
           "srv = http.server.HTTPServer(('127.0.0.1', port), H)\n"
           "threading.Thread(target=srv.serve_forever, daemon=True).start()\n"
           "def term(*_):\n"
           "    open(log, 'a').write(name + '\\n')\n"
           "    time.sleep(0.3)\n"
           "    os._exit(0)\n"
           "signal.signal(signal.SIGTERM, term)\n"
           "time.sleep(life if life > 0 else 600)\n"
           "os._exit(3)\n")


def _proc(name: str, log: Path, life: float = 0) -> ProcPlan:
    port = free_port()
    return ProcPlan(name=name, argv=[sys.executable, "-c", STANDIN, str(log), name, str(port), str(life)], env={},
                    ready_urls=[f"http://127.0.0.1:{port}/health"], ports=[port])


def test_a_failing_group_is_given_up_alone_and_the_router_stops_last(tmp_path):
    log = tmp_path / "terms.txt"
    bad = GroupPlan("prefill-0", "prefill", _proc("prefill-0/leader", log, life=3), [])
    good = GroupPlan("decode-0", "decode", _proc("decode-0/leader", log), [_proc("decode-0/sidecar-0", log)])
    plan = StackPlan(groups=[good, bad], router=_proc("router", log), router_url="http://127.0.0.1:1",
                     endpoints=[], rank_urls={})
    out = io.StringIO()
    launcher = Launcher(load_spec(default_spec_path()), plan, quiet=True, log_dir=None, ready_timeout=30,
                        max_restarts=0, state_file=tmp_path / "state.json", out=out, stop_grace=10)

    async def scenario():
        run = asyncio.create_task(launcher.run())
        for _ in range(400):
            await asyncio.sleep(0.05)
            if "giving up" in out.getvalue() and "router" in launcher.running:
                break
        # the failed group is gone; the healthy group and the router still run
        assert "prefill-0/leader" not in launcher.running
        for name in ("decode-0/leader", "decode-0/sidecar-0", "router"):
            assert launcher.running[name].proc.returncode is None, name
        launcher.stop.set()
        return await run

    code = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert code == 1                                  # a group was given up: the run did not end well
    text = out.getvalue()
    assert "prefill-0/leader exited with code 3" in text and "the other groups keep serving" in text
    order = log.read_text().split()
    assert order[-1] == "router" and set(order) == {"decode-0/leader", "decode-0/sidecar-0", "router"}, order
