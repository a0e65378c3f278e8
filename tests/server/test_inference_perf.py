"""The real inference-perf 0.7.0 (its own venv, offline, tokenizer = the tiny model's directory) against a
real `wideep serve`: a short concurrent stage must end with 0 failures and 0 token-count mismatches
(each streamed chunk re-tokenized client-side must add up to the server's usage.completion_tokens)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from server_harness import start_server, stop_server


def _config(base_url: str, tokenizer_dir: Path, out: Path, concurrency: int, num_requests: int,
            isl: int, osl: int) -> dict:
    return {
        "load": {"type": "concurrent", "stages": [{"concurrency_level": concurrency, "num_requests": num_requests}],
                 "num_workers": 1},
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "model_name": "tiny", "base_url": base_url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer_dir)},
        "data": {"type": "random",
                 "input_distribution": {"min": isl, "max": isl, "mean": isl, "std_dev": 0},
                 "output_distribution": {"min": osl, "max": osl, "mean": osl, "std_dev": 0}},
        "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": False}},
        "storage": {"local_storage": {"path": str(out)}},
    }


def _run(tiny_model_dir: Path, tmp: Path, concurrency: int, num_requests: int, isl: int, osl: int) -> dict:
    from inference_perf_tool import ensure_inference_perf

    exe = ensure_inference_perf()
    srv = start_server(tiny_model_dir, tmp, dp_size=2, api_key=None, kv_events=False)
    try:
        out = tmp / "report"
        cfg = tmp / "inference-perf.yaml"
        cfg.write_text(yaml.safe_dump(_config(srv.url(0), tiny_model_dir, out, concurrency, num_requests, isl, osl)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([str(exe), "-c", str(cfg)], cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summaries = list(out.rglob("summary_lifecycle_metrics.json"))
        assert summaries, f"no summary written under {out}: {proc.stdout[-2000:]}"
        return json.loads(summaries[0].read_text())
    finally:
        stop_server(srv)


def _check(summary: dict, num_requests: int, osl: int) -> None:
    assert summary["failures"]["count"] == 0, summary["failures"]
    ok = summary["successes"]
    assert ok["count"] == num_requests
    assert ok["token_count_mismatches"] == 0
    assert ok["output_tokens"]["total"] == num_requests * osl


def test_inference_perf_short_concurrent_stage(tiny_model_dir, tmp_path):
    summary = _run(tiny_model_dir, tmp_path, concurrency=4, num_requests=12, isl=48, osl=16)
    _check(summary, 12, 16)


@pytest.mark.slow
def test_inference_perf_concurrent_16(tiny_model_dir, tmp_path):
    summary = _run(tiny_model_dir, tmp_path, concurrency=16, num_requests=160, isl=200, osl=100)
    _check(summary, 160, 100)
