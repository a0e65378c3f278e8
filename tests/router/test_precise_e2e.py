"""End to end with a real `wideep serve` (tiny model, 2 DP ranks, KV events + replay on): the router
tokenizes through the server (token-producer vllm mode, no url: it asks a pool endpoint), follows
both ranks' KV events, and sends requests sharing a long prefix to the rank that cached it.
(~10-20 s: it starts the engine; test_kv_replay.py and test_plugins_more.py test the parts alone.)"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))

from router_helpers import RouterThread, router_options  # noqa: E402

CONFIG = """
plugins:
- {type: token-producer, parameters: {vllm: {url: "", timeoutMs: 10000}}}
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSize: 16}
    kvEventsConfig: {topicFilter: "kv@", podDiscoveryConfig: {socketPort: KVPORT, replayPort: REPLAYPORT}}
- {type: precise-prefix-cache-scorer}
- {type: active-request-scorer}
schedulingProfiles:
- {name: default, plugins: [{pluginRef: precise-prefix-cache-scorer, weight: 3}, {pluginRef: active-request-scorer}]}
"""


def test_requests_sharing_a_prefix_follow_the_engines_kv_events(tiny_model_dir, tmp_path):
    from server_harness import start_server, stop_server
    from openai import OpenAI

    server = start_server(tiny_model_dir, tmp_path, dp_size=2, api_key=None)
    try:
        kv = server.kv_events_port
        cfg = CONFIG.replace("REPLAYPORT", str(kv + 2)).replace("KVPORT", str(kv))
        opts = router_options(config_text=cfg, endpoints=[f"127.0.0.1:{server.port},name=s-rank-0,rank=0",
                                                          f"127.0.0.1:{server.port + 1},name=s-rank-1,rank=1"])
        with RouterThread(opts) as rt:
            producer = rt.router.cfg.plugins["precise-prefix-cache-producer"]
            tokenizer = rt.router.cfg.plugins["token-producer"].remote
            client = OpenAI(base_url=f"http://127.0.0.1:{opts.proxy_port}/v1", api_key="none", timeout=120)
            system = "You are a careful assistant. " * 12

            def ask(tail):
                client.chat.completions.create(model="tiny", max_tokens=2, messages=[
                    {"role": "system", "content": system}, {"role": "user", "content": tail}])

            ask("first question")
            deadline = time.monotonic() + 30
            while not producer.index.engine_keys and time.monotonic() < deadline:
                time.sleep(0.05)
            holders = [n for n, keys in producer.index.engine_keys.items() if keys]
            assert len(holders) == 1, producer.index.engine_keys.keys()
            picks = rt.router.metrics.picks
            before = picks.labels("default", holders[0])._value.get()
            for i in range(4):
                ask(f"follow-up number {i}")
            assert picks.labels("default", holders[0])._value.get() - before == 4
            assert tokenizer.calls >= 5 and tokenizer.failures == 0     # the server's own token ids
    finally:
        stop_server(server)
