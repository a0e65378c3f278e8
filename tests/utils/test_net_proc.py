"""Port checks treat TIME_WAIT as free (the servers bind with SO_REUSEADDR), exit codes read as words,
and the termination helper reaps what it stops."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys

from wideep.utils.openai_errors import client_message, error_body, error_headers
from wideep.utils.net import _is_free
from wideep.utils.proc import describe_exit, terminate


def test_a_port_in_time_wait_is_free_for_a_server():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()          # the server side closes first: its end of the connection enters TIME_WAIT
    cli.recv(1)
    cli.close()
    srv.close()
    with socket.socket() as plain:   # what the old check did: a bind without SO_REUSEADDR fails
        try:
            plain.bind(("127.0.0.1", port))
            in_time_wait = False
        except OSError:
            in_time_wait = True
    assert in_time_wait
    assert _is_free(port)
    with socket.socket() as s:      # ... and a server binding as ours do really can
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)
        assert not _is_free(port)   # a listener still makes it busy


def test_exit_codes_in_words():
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "exited (exit status unknown)"


def test_terminate_escalates_and_reaps():
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                                 "time.sleep(600)"], stdout=subprocess.PIPE, start_new_session=True)
    assert stubborn.stdout.readline().strip() == b"up"
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    terminate([stubborn, polite], grace=0.5, group=True)
    assert stubborn.returncode == -signal.SIGKILL and polite.returncode == -signal.SIGTERM


def test_one_error_body_everywhere():
    assert error_body("nope", 503) == {"error": {"message": "nope", "type": "ServiceUnavailableError",
                                                 "param": None, "code": 503}}
    assert error_body("bad", 400, "prompt")["error"]["type"] == "BadRequestError"
    assert error_headers(503)["Retry-After"] == "1" and "Retry-After" not in error_headers(429)
    msg = client_message("RuntimeError: gloo read failed at /opt/venv/lib/python3.12/site-packages/torch/x.py:12\n"
                         "Traceback (most recent call last): ...")
    assert msg.startswith("RuntimeError: gloo read failed at <path>") and "site-packages" not in msg
