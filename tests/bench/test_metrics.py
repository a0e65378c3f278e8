"""Each metric definition (docs/protocols.md, "Benchmark compatibility") on hand-made timings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from wideep.bench.metrics import (error_label, failures_by_label, request_metrics, summarize, summarize_requests,
                                  token_count_mismatch, token_times)
from wideep.bench.records import RequestRecord
from wideep.bench.report_br import aggregate
from wideep.bench.tokenizer import BenchTokenizer


@pytest.fixture(scope="module")
def tok(word_tokenizer):
    return BenchTokenizer(str(word_tokenizer))


def streamed(start, chunks, end, usage=None, stage=0, input_tokens=10):
    """chunks: [(arrival_time, text)]."""
    text = "".join(t for _, t in chunks)
    return RequestRecord(stage_id=stage, scheduled_time=start, start_time=start, end_time=end, request_data="{}",
                         streamed=True, input_tokens=input_tokens, output_tokens=len(text.split()),
                         server_usage=usage, chunk_times=[c[0] for c in chunks], chunk_texts=[c[1] for c in chunks],
                         output_text=text)


def test_multi_token_chunk_stamps_every_token_with_the_chunk_arrival(tok):
    rec = streamed(0.5, [(1.0, "w1 w2 w3"), (1.5, " w4")], 1.6)
    stamps = token_times(rec, tok)
    assert stamps == [1.0, 1.0, 1.0, 1.5]
    m = request_metrics(rec, stamps)
    assert m["inter_token_latency_deltas"] == pytest.approx([0.0, 0.0, 0.5])  # k tokens -> k-1 zeros
    assert m["time_to_first_token"] == pytest.approx(0.5)
    assert m["time_per_output_token"] == pytest.approx((1.5 - 1.0) / 3)
    assert m["request_latency"] == pytest.approx(1.1)


def test_ntpot_includes_ttft_and_covers_non_streamed_requests(tok):
    rec = streamed(0.0, [(2.0, "w1"), (2.1, " w2"), (2.2, " w3"), (2.3, " w4")], 2.4)
    m = request_metrics(rec, token_times(rec, tok))
    assert m["normalized_time_per_output_token"] == pytest.approx(2.4 / 4)  # TTFT of 2 s is inside
    assert m["time_per_output_token"] == pytest.approx(0.1)
    unary = RequestRecord(0, 0.0, 0.0, 3.0, "{}", streamed=False, input_tokens=5, output_tokens=6, output_text="w " * 6)
    mu = request_metrics(unary, token_times(unary, tok))
    assert mu["normalized_time_per_output_token"] == pytest.approx(0.5)
    assert mu["time_to_first_token"] is None and mu["time_per_output_token"] is None


def test_itl_is_pooled_across_requests_not_averaged_per_request(tok):
    a = streamed(0.0, [(1.0, "w1 w2 w3 w4 w5")] + [(1.0 + 0.9, " w6")], 2.0)  # deltas 0,0,0,0,0.9
    b = streamed(0.0, [(1.0, "w1"), (1.1, " w2")], 1.2)  # delta 0.1
    s = summarize_requests([a, b], tok)
    itl = s["successes"]["latency"]["inter_token_latency"]
    pooled = [0, 0, 0, 0, 0.9, 0.1]
    assert itl["median"] == pytest.approx(float(np.percentile(pooled, 50)))
    assert itl["mean"] == pytest.approx(np.mean(pooled))
    assert itl["max"] == pytest.approx(0.9)
    # per-request TPOT is one value per request
    tpot = s["successes"]["latency"]["time_per_output_token"]
    assert tpot["min"] == pytest.approx(0.1) and tpot["max"] == pytest.approx(0.9 / 5)


def test_throughput_divides_by_max_end_minus_min_start(tok):
    a = streamed(10.0, [(11.0, "w1 w2")], 12.0, input_tokens=100)
    b = streamed(11.0, [(12.0, "w1 w2 w3")], 14.0, input_tokens=50)
    thr = summarize_requests([a, b], tok)["successes"]["throughput"]
    assert thr["output_tokens_per_sec"] == pytest.approx(5 / 4.0)
    assert thr["input_tokens_per_sec"] == pytest.approx(150 / 4.0)
    assert thr["total_tokens_per_sec"] == pytest.approx(155 / 4.0)
    assert thr["requests_per_sec"] == pytest.approx(2 / 4.0)


def test_failures_are_counted_by_label(tok):
    body = json.dumps({"error": {"message": "upstream timed out", "type": "x", "param": None, "code": 504}})
    fails = [
        RequestRecord(0, 0, 0, 1, "{}", True, error_type="HTTP Error 504", error_msg=body),
        RequestRecord(0, 0, 0, 1, "{}", True, error_type="HTTP Error 504", error_msg=body),
        RequestRecord(0, 0, 0, 1, "{}", True, error_type="HTTP Error 400", error_msg="maximum context length exceeded"),
        RequestRecord(0, 0, 0, 1, "{}", True, error_type="ClientPayloadError", error_msg="Response payload is not completed"),
        RequestRecord(0, 0, 0, 1, "{}", True, error_type="TimeoutError", error_msg="Request timed out"),
        RequestRecord(0, 0, 0, 1, "{}", True, error_type="ClientConnectorError", error_msg="Cannot connect to host"),
    ]
    ok = streamed(0.0, [(0.5, "w1"), (0.6, " w2")], 0.7)
    s = summarize_requests(fails + [ok], tok)
    labels = {k: v["count"] for k, v in s["failures"]["by_label"].items()}
    assert labels == {"504 - Gateway Timeout": 2, "400 - Context Window": 1, "clientpayloaderror": 1,
                      "Timeout": 1, "Connection Error": 1}
    assert s["failures"]["count"] == 6 and s["successes"]["count"] == 1
    assert s["failures"]["by_label"]["504 - Gateway Timeout"]["messages"] == [{"message": "upstream timed out"}]
    assert error_label("HTTP Error 418", "teapot") == "418 - other"
    assert list(failures_by_label(fails))[0] == "504 - Gateway Timeout"  # sorted by count


def test_token_count_mismatch_compares_chunk_tokens_with_server_usage(tok):
    good = streamed(0, [(1, "w1 w2"), (2, " w3")], 3, usage={"prompt_tokens": 10, "completion_tokens": 3})
    bad = streamed(0, [(1, "w1 w2"), (2, " w3")], 3, usage={"prompt_tokens": 10, "completion_tokens": 4})
    assert not token_count_mismatch(good, tok) and token_count_mismatch(bad, tok)
    assert summarize_requests([good, bad], tok)["successes"]["token_count_mismatches"] == 1


def test_summarize_uses_numpy_linear_percentiles():
    vals = [0.3, 0.1, 0.7, 0.2, 0.9]
    s = summarize(vals)
    assert s["median"] == pytest.approx(np.percentile(vals, 50))
    assert s["p99.9"] == pytest.approx(np.percentile(vals, 99.9))
    assert s["p0.1"] == pytest.approx(np.percentile(vals, 0.1))
    assert set(s) == {"mean", "min", "max", "p0.1", "p1", "p5", "p10", "p25", "median", "p75", "p90", "p95", "p99", "p99.9"}
    assert summarize([]) is None


def test_load_summary_for_a_concurrent_stage(tok):
    recs = [streamed(1.0 + i, [(1.5 + i, "w1"), (1.6 + i, " w2")], 2.0 + i) for i in range(3)]
    for i, r in enumerate(recs):
        r.scheduled_time = 1.0
    ls = summarize_requests(recs, tok, stage_rate=3.0, stage_concurrency=1)["load_summary"]
    assert ls["count"] == 3 and ls["requested_rate"] == 3.0 and ls["concurrency"] == 1
    assert ls["send_duration"] == pytest.approx(2.0) and ls["achieved_rate"] == pytest.approx(1.5)
    assert ls["schedule_delay"]["max"] == pytest.approx(2.0)


def test_benchmark_report_v02_shape_and_units(tok):
    recs = [streamed(0.0, [(0.5, "w1 w2"), (0.7, " w3")], 0.8, usage={"prompt_tokens": 10, "completion_tokens": 3}),
            streamed(0.1, [(0.4, "w1"), (0.6, " w2")], 0.9)]
    recs.append(RequestRecord(0, 0, 0, 1, "{}", True, error_type="HTTP Error 503", error_msg="busy"))
    agg = aggregate(recs, tok)
    assert agg["requests"]["total"] == 3 and agg["requests"]["failures"] == 1
    keys = {"units", "mean", "stddev", "min", "p0p1", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99",
            "p99p9", "max"}
    units = {"time_to_first_token": "s", "request_latency": "s", "time_per_output_token": "s/token",
             "normalized_time_per_output_token": "s/token", "inter_token_latency": "s/token"}
    for name, unit in units.items():
        assert set(agg["latency"][name]) == keys and agg["latency"][name]["units"] == unit
    assert agg["requests"]["input_length"]["units"] == "count"
    assert agg["throughput"]["output_token_rate"] == {"units": "tokens/s", "mean": pytest.approx(5 / 1.0)}
    assert agg["throughput"]["request_rate"]["units"] == "queries/s"
