"""wideep bench against a real `wideep serve` of the tiny DeepSeek-V3 (started and stopped the way
`--stack` does it): the server's stream shape gives 0 token-count mismatches and exact usage.
The chat variant is opt-in (slow: a second server start); its fake-server sibling is
test_bench_run.py::test_shared_prefix_chat_and_poisson_rate_stage."""
from __future__ import annotations

import json
import os
import sys

import pytest

from wideep.bench.config import parse_config
from wideep.bench.runner import RunOptions, run_benchmark
from wideep.bench.stack import Stack
from wideep.utils.net import free_port_range

N, ISL, OSL = 6, 24, 8


@pytest.mark.parametrize("api", ["completion", pytest.param("chat", marks=pytest.mark.slow)])
def test_bench_against_tiny_model_server(tiny_model_dir, tmp_path, api):
    base = free_port_range(2)
    port, sup = base, base + 1
    cmd = [sys.executable, "-m", "wideep", "serve", str(tiny_model_dir), "--port", str(port), "--host", "127.0.0.1",
           "--data-parallel-size", "1", "--data-parallel-supervisor-port", str(sup), "--served-model-name", "tiny",
           "--max-model-len", "256", "--block-size", "16", "--max-num-seqs", "8", "--kv-cache-memory-bytes", "32m"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = ({"type": "random", "input_distribution": {"min": ISL, "max": ISL, "mean": ISL, "std_dev": 0},
             "output_distribution": {"min": OSL, "max": OSL, "mean": OSL, "std_dev": 0}} if api == "completion" else
            {"type": "shared_prefix", "shared_prefix": {"num_groups": 1, "num_prompts_per_group": N,
                                                        "system_prompt_len": 16, "question_len": 8, "output_len": OSL}})
    with Stack("tiny", base_url=f"http://127.0.0.1:{port}", ready_timeout=240, command=cmd) as stack:
        cfg = parse_config({
            "load": {"type": "concurrent", "stages": [{"concurrency_level": 2, "num_requests": N}]},
            "api": {"type": api, "streaming": True},
            "server": {"type": "vllm", "base_url": stack.base_url, "ignore_eos": True},  # model name from /v1/models
            "tokenizer": {"pretrained_model_name_or_path": str(tiny_model_dir)},
            "data": data,
            "report": {"request_lifecycle": {"per_request": True}},
            "storage": {"local_storage": {"path": str(tmp_path / "run")}},
        })
        out = run_benchmark(cfg, RunOptions(progress=False, plots=False, seed=11))
    assert stack.proc.poll() is not None
    s = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    assert s["failures"]["count"] == 0, s["failures"]["by_label"]
    ok = s["successes"]
    assert ok["count"] == N and ok["token_count_mismatches"] == 0
    assert ok["output_tokens"]["total"] == N * OSL  # ignore_eos + max_tokens honoured, usage chunk read
    assert ok["client_fallback_requests"] == {"prompt": 0, "output": 0}
    if api == "completion":
        assert ok["prompt_tokens"]["mean"] == pytest.approx(ISL, abs=1)  # the server counts the same prompt
    assert ok["latency"]["time_to_first_token"]["max"] > 0


@pytest.mark.slow
def test_bench_stack_default_end_to_end(tmp_path):
    """`wideep bench --stack default`: the embedded tiny P/D stack (router + prefill + decode) from
    nothing to a report, then stopped. Heavy on 2 cores (4 engine processes): opt-in."""
    import subprocess

    import yaml

    from wideep.utils.net import free_port

    cfg = tmp_path / "w.yaml"
    cfg.write_text(yaml.safe_dump({
        "load": {"type": "concurrent", "stages": [{"concurrency_level": 2, "num_requests": 4}]},
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "ignore_eos": True},
        "data": {"type": "random", "input_distribution": {"min": 20, "max": 20, "mean": 20, "std_dev": 0},
                 "output_distribution": {"min": 6, "max": 6, "mean": 6, "std_dev": 0}},
    }))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "wideep", "bench", "--stack", "default", "--stack-args",
                           f"--router-port {free_port()}", "-c", str(cfg), "-o", str(out), "--no-plots"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    s = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    assert s["successes"]["count"] == 4 and s["successes"]["token_count_mismatches"] == 0
