"""`wideep bench` against the fake OpenAI server (a real subprocess on an ephemeral port)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from wideep.bench.config import parse_config
from wideep.bench.runner import RunOptions, run_benchmark

FAKE = Path(__file__).parents[1] / "fake_openai_server.py"


def workload(url: str, tok: Path, out: Path, *, stages=None, load_type="concurrent", api="completion",
             data=None, per_request=True, timeout=None) -> dict:
    cfg = {
        "load": {"type": load_type, "stages": stages or [{"concurrency_level": 4, "num_requests": 20}], "num_workers": 1,
                 "interval": 0.2},
        "api": {"type": api, "streaming": True},
        "server": {"type": "vllm", "model_name": "fake/model", "base_url": url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(tok)},
        "data": data or {"type": "random", "input_distribution": {"min": 40, "max": 40, "mean": 40, "std_dev": 0},
                         "output_distribution": {"min": 12, "max": 12, "mean": 12, "std_dev": 0}},
        "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": per_request}},
        "storage": {"local_storage": {"path": str(out)}},
    }
    if timeout:
        cfg["load"]["request_timeout"] = timeout
    return cfg


def test_errors_and_mid_stream_disconnects_are_counted_not_fatal(fake_server, word_tokenizer, tmp_path):
    srv = fake_server("--itl", "0.002", "--ttft", "0.005", "--fail-every", "5", "--fail-status", "503",
                      "--disconnect-every", "7", "--disconnect-after", "4")
    out = run_benchmark(parse_config(workload(srv.url, word_tokenizer, tmp_path / "r")),
                        RunOptions(progress=False, plots=False, seed=1))
    s = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    labels = {k: v["count"] for k, v in s["failures"]["by_label"].items()}
    # requests 5,10,15,20 fail with 503; 7 and 14 are dropped mid-stream (21 would be, but there are 20)
    assert labels == {"503 - Service Unavailable": 4, "clientpayloaderror": 2}
    assert s["successes"]["count"] == 14 and s["failures"]["count"] == 6 and s["load_summary"]["count"] == 20
    assert s["successes"]["token_count_mismatches"] == 0
    assert s["successes"]["output_tokens"]["total"] == 14 * 12
    per_req = json.loads((out / "per_request_lifecycle_metrics.json").read_text())
    assert len(per_req) == 20 and sum(1 for r in per_req if r["error"]) == 6
    dropped = [r for r in per_req if r["error"] and r["error"]["error_type"] == "ClientPayloadError"]
    assert all("data:" in r["response"] for r in dropped)  # the bytes received before the drop are kept


def test_server_gone_and_timeouts_are_failures(fake_server, word_tokenizer, tmp_path):
    from wideep.utils.net import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    cfg = parse_config(workload(dead, word_tokenizer, tmp_path / "dead", stages=[{"concurrency_level": 2, "num_requests": 3}]))
    out = run_benchmark(cfg, RunOptions(progress=False, plots=False, seed=1))
    s = json.loads((out / "summary_lifecycle_metrics.json").read_text())
    assert s["failures"]["by_label"] == {"Connection Error": {"count": 3, "messages": s["failures"]["by_label"]["Connection Error"]["messages"]}}
    slow = fake_server("--ttft", "5")
    cfg = parse_config(workload(slow.url, word_tokenizer, tmp_path / "slow", timeout=0.3,
                                stages=[{"concurrency_level": 2, "num_requests": 2}]))
    s = json.loads((run_benchmark(cfg, RunOptions(progress=False, plots=False)) / "summary_lifecycle_metrics.json").read_text())
    assert {k: v["count"] for k, v in s["failures"]["by_label"].items()} == {"Timeout": 2}


def test_cli_run_writes_reports_plots_and_multi_token_itl_zeros(fake_server, word_tokenizer, tmp_path):
    srv = fake_server("--itl", "0.002", "--ttft", "0.005", "--tokens-per-chunk", "3")
    cfg_file = tmp_path / "w.yaml"
    cfg_file.write_text(yaml.safe_dump(workload(srv.url, word_tokenizer, tmp_path / "unused",
                                                stages=[{"concurrency_level": 2, "num_requests": 6},
                                                        {"concurrency_level": 4, "num_requests": 8}])))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "wideep", "bench", "-c", str(cfg_file), "-o", str(out), "--seed", "3"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "done 8/8, in flight 0, failures 0" in proc.stdout  # the plain progress line (stdout is not a TTY)
    for f in ("summary_lifecycle_metrics.json", "stage_0_lifecycle_metrics.json", "stage_1_lifecycle_metrics.json",
              "per_request_lifecycle_metrics.json", "benchmark_report_v0.2_stage_0.yaml", "config.yaml"):
        assert (out / f).stat().st_size > 0, f
    for png in ("latency_vs_load.png", "throughput_vs_latency.png", "ttft_cdf.png", "tpot_cdf.png",
                "output_tokens_per_gpu.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    stage1 = json.loads((out / "stage_1_lifecycle_metrics.json").read_text())
    assert stage1["load_summary"]["concurrency"] == 4 and stage1["load_summary"]["requested_rate"] == 8
    itl = stage1["successes"]["latency"]["inter_token_latency"]
    assert itl["median"] == 0.0 and itl["max"] > 0  # 3 tokens per chunk: 2 zeros per chunk
    assert stage1["successes"]["token_count_mismatches"] == 0
    br = yaml.safe_load((out / "benchmark_report_v0.2_stage_1.yaml").read_text())
    agg = br["results"]["request_performance"]["aggregate"]
    assert br["version"] == "0.2" and agg["requests"]["total"] == 8
    assert agg["latency"]["inter_token_latency"]["p50"] == 0.0
    assert agg["latency"]["time_to_first_token"]["units"] == "s"
    assert br["scenario"]["load"]["standardized"]["concurrency"] == 4


def test_shared_prefix_chat_and_poisson_rate_stage(fake_server, word_tokenizer, tmp_path):
    srv = fake_server("--itl", "0.001", "--ttft", "0.002")
    data = {"type": "shared_prefix", "shared_prefix": {"num_groups": 2, "num_prompts_per_group": 3,
                                                       "system_prompt_len": 20, "question_len": 5, "output_len": 6}}
    cfg = parse_config(workload(srv.url, word_tokenizer, tmp_path / "sp", load_type="poisson", api="chat", data=data,
                                stages=[{"rate": 10, "duration": 1}]))
    out = run_benchmark(cfg, RunOptions(progress=False, plots=False, seed=5))
    s = json.loads((out / "stage_0_lifecycle_metrics.json").read_text())
    assert s["failures"]["count"] == 0 and s["successes"]["count"] >= 1
    assert s["successes"]["prompt_tokens"]["min"] == 25  # server count of system (20) + question (5)
    assert s["load_summary"]["requested_rate"] == 10
    reqs = json.loads((out / "per_request_lifecycle_metrics.json").read_text())
    bodies = [json.loads(r["request"]) for r in reqs]
    assert all(b["messages"][0]["role"] == "system" and b["max_tokens"] == 6 for b in bodies)
    assert len({b["messages"][0]["content"] for b in bodies}) <= 2


def test_compare_two_targets_side_by_side(fake_server, word_tokenizer, tmp_path):
    fast = fake_server("--itl", "0.001", "--ttft", "0.002")
    slow = fake_server("--itl", "0.004", "--ttft", "0.01")
    cfg_file = tmp_path / "w.yaml"
    cfg_file.write_text(yaml.safe_dump(workload(fast.url, word_tokenizer, tmp_path / "x", per_request=False,
                                                stages=[{"concurrency_level": 2, "num_requests": 6}])))
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "wideep", "bench", "-c", str(cfg_file), "--target", fast.url,
                           "--target", slow.url, "--label", "fast", "--label", "slow", "-o", str(out), "--no-plots"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "TPOT p50" in proc.stdout and "fast" in proc.stdout and "slow" in proc.stdout
    csv = (out / "compare" / "comparison.csv").read_text().splitlines()
    assert csv[0] == "stage,metric,fast,slow,delta"
    tpot = next(line.split(",") for line in csv if ",TPOT p50 (s)," in line)
    assert float(tpot[3]) > float(tpot[2])  # the slow server has the larger TPOT
    assert (out / "compare" / "ttft_cdf.png").stat().st_size > 0
    # and the standalone compare sub-command over the two finished runs
    proc = subprocess.run([sys.executable, "-m", "wideep", "bench", "compare", str(out / "fast"), str(out / "slow"),
                           "-o", str(tmp_path / "cmp2")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmp2" / "throughput_vs_latency.png").stat().st_size > 0


def test_stack_is_started_benchmarked_and_stopped(word_tokenizer, tmp_path):
    """--stack's lifecycle with a stand-in stack command (the fake server) as a real subprocess."""
    from wideep.bench.stack import Stack
    from wideep.utils.net import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack("unused.yaml", base_url=url, ready_timeout=60,
                  command=[sys.executable, str(FAKE), "--port", str(port), "--max-seconds", "120"])
    with stack:
        cfg = parse_config(workload(stack.base_url, word_tokenizer, tmp_path / "st",
                                    stages=[{"concurrency_level": 2, "num_requests": 4}]))
        out = run_benchmark(cfg, RunOptions(progress=False, plots=False))
        assert json.loads((out / "summary_lifecycle_metrics.json").read_text())["successes"]["count"] == 4
    assert stack.proc.poll() is not None  # stopped by SIGTERM
