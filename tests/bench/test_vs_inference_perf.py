"""wideep bench and the real inference-perf 0.7.0, same workload, same fake server: same numbers.

Counts must be equal; latencies and throughputs agree within run-to-run noise (generous relative
tolerances: both clients share two CPU cores with the server). inference-perf is installed once
into .venv-bench by scripts/install_inference_perf.sh; the test is skipped when that cannot run.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from wideep.bench.config import parse_config
from inference_perf_tool import InferencePerfUnavailable, ensure_inference_perf
from wideep.bench.runner import RunOptions, run_benchmark

from test_bench_run import workload  # noqa: E402 (same directory, on sys.path under pytest)

N, CONC, ISL, OSL = 48, 4, 60, 24


@pytest.fixture(scope="module")
def inference_perf():
    try:
        return ensure_inference_perf()
    except InferencePerfUnavailable as exc:
        pytest.skip(f"real inference-perf unavailable: {exc}")


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_report_agrees_with_real_inference_perf(inference_perf, fake_server, word_tokenizer, tmp_path):
    srv = fake_server("--itl", "0.01", "--ttft", "0.03", "--tokens-per-chunk", "2")
    cfg = workload(srv.url, word_tokenizer, tmp_path / "ip", stages=[{"concurrency_level": CONC, "num_requests": N}],
                   data={"type": "random",
                         "input_distribution": {"min": ISL, "max": ISL, "mean": ISL, "std_dev": 0},
                         "output_distribution": {"min": OSL, "max": OSL, "mean": OSL, "std_dev": 0}})
    cfg_file = tmp_path / "ip.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(inference_perf), "-c", str(cfg_file)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    theirs = json.loads((tmp_path / "ip" / "stage_0_lifecycle_metrics.json").read_text())

    cfg["storage"]["local_storage"]["path"] = str(tmp_path / "wideep")
    out = run_benchmark(parse_config(cfg), RunOptions(progress=False, plots=False, seed=7))
    ours = json.loads((out / "stage_0_lifecycle_metrics.json").read_text())

    # same structure
    assert set(theirs["successes"]["latency"]) == set(ours["successes"]["latency"])
    assert set(theirs["successes"]["throughput"]) >= set(ours["successes"]["throughput"])
    for key in ("load_summary", "failures"):
        assert set(ours[key]) <= set(theirs[key]) | {"by_label"}, key
    assert set(ours["successes"]["latency"]["time_to_first_token"]) == set(theirs["successes"]["latency"]["time_to_first_token"])
    # exact counts
    for side in (theirs, ours):
        s = side["successes"]
        assert s["count"] == N and side["failures"]["count"] == 0
        assert s["token_count_mismatches"] == 0
        assert s["prompt_tokens"]["total"] == N * ISL and s["output_tokens"]["total"] == N * OSL
        assert s["output_len"]["mean"] == OSL
        assert side["load_summary"]["count"] == N and side["load_summary"]["requested_rate"] == N
        assert side["load_summary"]["concurrency"] == CONC
        # 2 tokens per chunk: every other pooled ITL delta is 0 in both tools
        assert s["latency"]["inter_token_latency"]["p25"] == 0.0
    # numbers within run-to-run noise
    lat_t, lat_o = theirs["successes"]["latency"], ours["successes"]["latency"]
    for metric in lat_t:
        print(f"{metric:34s} mean inference-perf {lat_t[metric]['mean']:.5f}  wideep {lat_o[metric]['mean']:.5f}")
    for metric in ("request_latency", "time_to_first_token", "time_per_output_token",
                   "normalized_time_per_output_token", "inter_token_latency"):
        for stat in ("mean", "median") if metric != "inter_token_latency" else ("mean", "p75"):
            a, b = lat_t[metric][stat], lat_o[metric][stat]
            assert _close(a, b, 0.5), f"{metric}.{stat}: inference-perf {a:.5f} vs wideep {b:.5f}"
    for k in ("output_tokens_per_sec", "input_tokens_per_sec", "requests_per_sec"):
        a, b = theirs["successes"]["throughput"][k], ours["successes"]["throughput"][k]
        assert _close(a, b, 0.5), f"{k}: inference-perf {a:.2f} vs wideep {b:.2f}"
