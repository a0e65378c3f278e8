"""llm-d-compatible router: EndpointPickerConfig-driven Endpoint Picker, built-in proxy, Envoy ext_proc,
and the decode pod's P/D routing sidecar (sidecar.py).

Python entry for launchers (no torch is imported):

    from wideep.router import RouterOptions, run_router, Router
    run_router(RouterOptions(endpoints=["127.0.0.1:8000,role=decode", "127.0.0.1:8100,role=prefill"], port=8080))

`Router(opts)` + `await router.start()` / `await router.stop()` embeds it in a running event loop.
"""
from __future__ import annotations


def __getattr__(name):
    if name in ("RouterOptions", "Router", "run_router"):
        from wideep.router import app

        return getattr(app, name)
    raise AttributeError(name)


__all__ = ["RouterOptions", "Router", "run_router"]
