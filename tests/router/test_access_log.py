"""At info level every HTTP tier logs one access line per request (wideep.logs.ACCESS_LOG)."""
from __future__ import annotations

import logging

from router_helpers import RouterThread, post, router_options, start_backends


def test_the_router_proxy_logs_one_access_line_per_request(caplog):
    (backend,) = start_backends(["d0"])
    try:
        with caplog.at_level(logging.INFO, logger="wideep.access"):
            with RouterThread(router_options(endpoints=[f"{backend.address},name=d0"])) as rt:
                for i in range(3):
                    st, _, body = post(rt.router.opts.proxy_port, {"model": "fake/model", "prompt": f"q{i}",
                                                                   "max_tokens": 2})
                    assert st == 200, body
        lines = [r.getMessage() for r in caplog.records if r.name == "wideep.access"]
        assert len(lines) == 3 and all('"POST /v1/completions HTTP/1.1" 200' in ln for ln in lines)
    finally:
        backend.kill()
