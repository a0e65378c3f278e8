"""wideep bench and the real inference-perf 0.7.0 against one real tiny-model `wideep serve` on CPU:
the same workload gives the same counts and latencies within run-to-run noise (issue 9's first
"Done when"). One server start serves both tools, one after the other, so the noise is real engine
noise plus two clients sharing the CPU with it: tolerances mirror test_vs_inference_perf.py, the
default-run sibling that does the same against the fake server. Opt-in (slow): a model load and two
benchmark runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from wideep.bench.config import parse_config
from inference_perf_tool import InferencePerfUnavailable, ensure_inference_perf
from wideep.bench.runner import RunOptions, run_benchmark
from wideep.bench.stack import Stack
from wideep.utils.net import free_port_range

N, CONC, ISL, OSL = 12, 2, 24, 8
MODEL = "tiny"


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _workload(base_url: str, tokenizer_dir, out_dir) -> dict:
    """One inference-perf config, read unchanged by both tools (only the output path differs)."""
    fixed = lambda n: {"min": n, "max": n, "mean": n, "std_dev": 0}  # noqa: E731
    return {
        "load": {"type": "concurrent", "stages": [{"concurrency_level": CONC, "num_requests": N}],
                 "num_workers": 1, "interval": 0.2},
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "model_name": MODEL, "base_url": base_url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer_dir)},
        "data": {"type": "random", "input_distribution": fixed(ISL), "output_distribution": fixed(OSL)},
        "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": True}},
        "storage": {"local_storage": {"path": str(out_dir)}},
    }


@pytest.mark.slow
def test_report_agrees_with_real_inference_perf_on_tiny_model_stack(tiny_model_dir, tmp_path):
    try:
        inference_perf = ensure_inference_perf()
    except InferencePerfUnavailable as exc:
        pytest.skip(f"real inference-perf unavailable: {exc}")
    base = free_port_range(2)
    port, sup = base, base + 1
    cmd = [sys.executable, "-m", "wideep", "serve", str(tiny_model_dir), "--port", str(port), "--host", "127.0.0.1",
           "--data-parallel-size", "1", "--data-parallel-supervisor-port", str(sup), "--served-model-name", MODEL,
           "--max-model-len", "256", "--block-size", "16", "--max-num-seqs", "8", "--kv-cache-memory-bytes", "32m"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with Stack(MODEL, base_url=f"http://127.0.0.1:{port}", ready_timeout=240, command=cmd) as stack:
        cfg = _workload(stack.base_url, tiny_model_dir, tmp_path / "ip")
        cfg_file = tmp_path / "ip.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([str(inference_perf), "-c", str(cfg_file)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        cfg["storage"]["local_storage"]["path"] = str(tmp_path / "wideep")
        out = run_benchmark(parse_config(cfg), RunOptions(progress=False, plots=False, seed=7))
    assert stack.proc.poll() is not None
    theirs = json.loads((tmp_path / "ip" / "stage_0_lifecycle_metrics.json").read_text())
    ours = json.loads((out / "stage_0_lifecycle_metrics.json").read_text())

    # exact counts: same successes/failures, every output token streamed and counted, usage read
    for name, side in (("inference-perf", theirs), ("wideep", ours)):
        s = side["successes"]
        assert side["failures"]["count"] == 0, (name, side["failures"])
        assert s["count"] == N and side["load_summary"]["count"] == N, name
        assert s["token_count_mismatches"] == 0, name
        assert s["output_tokens"]["total"] == N * OSL, name
        print(f"{name:15s} prompt_tokens total {s['prompt_tokens']['total']}  output_tokens total "
              f"{s['output_tokens']['total']}")
    t, o = theirs["successes"], ours["successes"]
    assert t["prompt_tokens"]["total"] == o["prompt_tokens"]["total"]
    assert o["prompt_tokens"]["mean"] == pytest.approx(ISL, abs=1)  # the server counts the prompt it was sent

    # latencies within run-to-run noise
    lat_t, lat_o = t["latency"], o["latency"]
    for metric in lat_t:
        print(f"{metric:34s} mean inference-perf {lat_t[metric]['mean']:.5f}  wideep {lat_o[metric]['mean']:.5f}  "
              f"median inference-perf {lat_t[metric]['median']:.5f}  wideep {lat_o[metric]['median']:.5f}")
    for metric in ("request_latency", "time_to_first_token", "time_per_output_token",
                   "normalized_time_per_output_token"):
        for stat in ("mean", "median"):
            a, b = lat_t[metric][stat], lat_o[metric][stat]
            assert _close(a, b, 0.5), f"{metric}.{stat}: inference-perf {a:.5f} vs wideep {b:.5f}"
    for k in ("output_tokens_per_sec", "requests_per_sec"):
        a, b = t["throughput"][k], o["throughput"][k]
        print(f"{k:34s} inference-perf {a:.3f}  wideep {b:.3f}")
        assert _close(a, b, 0.5), f"{k}: inference-perf {a:.2f} vs wideep {b:.2f}"
