"""Entry point of the supervisor's child processes: `python -m wideep.server.child engine|frontend JSON`.

Children are plain subprocesses (not multiprocessing): each gets its own environment the way an LWS
pod's container would (CUDA_VISIBLE_DEVICES slice, DP rank variables), shows up in `ps` under its
role, and dies with the supervisor (PR_SET_PDEATHSIG) so a killed supervisor never leaves an engine
holding a GPU. SIGINT is ignored: Ctrl-C reaches the whole process group, but only the supervisor
decides the shutdown order (drain frontends, then stop engines).
"""
from __future__ import annotations

import json
import signal
import sys

from wideep.utils.proc import die_with_parent


def main(argv: list[str]) -> int:
    role, payload = argv[0], json.loads(argv[1])
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if role == "engine":
        from wideep.server.engine_launch import run_engine

        run_engine(payload)
        return 0
    if role == "frontend":
        from wideep.server.frontend import run_frontend

        return run_frontend(payload)
    print(f"unknown child role {role!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
