"""The metric definitions (docs/protocols.md, "Benchmark compatibility"; inference-perf reportgen) in one place.

- TTFT = first token stamp - start; a token stamp is the arrival time of the chunk that carried it.
- request_latency = end - start.
- NTPOT = request_latency / output_tokens (includes TTFT; computed for non-streamed requests too).
- TPOT = (last token stamp - first token stamp) / (output_tokens - 1), one value per request.
- ITL = deltas between consecutive token stamps, pooled across requests: a chunk of k tokens
  gives k-1 zeros and one gap.
- throughput = sum(tokens) / (max end - min start); the window spans every request of the set.
- failures are counted per label ("504 - Gateway Timeout", "Timeout", ...).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any, Iterable, Optional

import numpy as np

from .records import RequestRecord
from .tokenizer import BenchTokenizer

DEFAULT_PERCENTILES = [0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9]


def summarize(values: Iterable[float], percentiles: list[float] = DEFAULT_PERCENTILES) -> Optional[dict[str, float]]:
    """{mean, min, max, p0.1 ... median ... p99.9} (numpy linear percentiles), or None when empty."""
    items = list(values)
    if not items:
        return None
    out = {"mean": float(np.mean(items)), "min": float(np.min(items)), "max": float(np.max(items))}
    for p in percentiles:
        out["median" if p == 50 else f"p{p:g}"] = float(np.percentile(items, p))
    return out


# ---------------------------------------------------------------- per-request

def token_times(rec: RequestRecord, tok: Optional[BenchTokenizer]) -> list[float]:
    """One stamp per output token: each chunk's tokens all get the chunk's arrival time."""
    if not rec.streamed:
        return []
    if tok is None:
        return list(rec.chunk_times)
    out: list[float] = []
    for text, t in zip(rec.chunk_texts, rec.chunk_times):
        out.extend([t] * tok.count_tokens(text, add_special_tokens=False))
    return out


def token_count_mismatch(rec: RequestRecord, tok: Optional[BenchTokenizer]) -> bool:
    """The per-chunk token count disagrees with the server's usage.completion_tokens."""
    if not rec.streamed or tok is None or not rec.chunk_texts:
        return False
    expected = (rec.server_usage or {}).get("completion_tokens")
    return expected is not None and len(token_times(rec, tok)) != expected


def effective_output_tokens(rec: RequestRecord, use_server: bool = False) -> int:
    if use_server and (rec.server_usage or {}).get("completion_tokens") is not None:
        return int(rec.server_usage["completion_tokens"])
    return rec.output_tokens


def request_metrics(rec: RequestRecord, stamps: list[float], use_server: bool = False) -> dict[str, Any]:
    """The latency metrics of one successful request."""
    latency = rec.end_time - rec.start_time
    out_tokens = effective_output_tokens(rec, use_server)
    ttft = tpot = itl = None
    deltas: list[float] = []
    if len(stamps) > 1:
        ttft = stamps[0] - rec.start_time
        if out_tokens > 1:
            tpot = (stamps[-1] - stamps[0]) / (out_tokens - 1)
        deltas = [b - a for a, b in zip(stamps, stamps[1:])]
        itl = sum(deltas) / len(deltas)
    return {
        "request_latency": latency,
        "normalized_time_per_output_token": latency / out_tokens if out_tokens > 0 else 0.0,
        "time_to_first_token": ttft,
        "time_per_output_token": tpot,
        "inter_token_latency": itl,
        "inter_token_latency_deltas": deltas,
    }


# ---------------------------------------------------------------- failures

_CODE_LABELS = {"429": "Rate Limit", "500": "Internal Server Error", "502": "Bad Gateway",
                "503": "Service Unavailable", "504": "Gateway Timeout"}
_HTTP_MESSAGE_LABELS = [
    (re.compile(r"context.window|context length|maximum context|max.?tokens|token.?limit", re.I), "Context Window"),
    (re.compile(r"invalid.?json|json.?parse|malformed.?json|unexpected.?token|expecting value|unterminated string", re.I),
     "Invalid JSON"),
    (re.compile(r"timeout|timed.?out", re.I), "Timeout"),
    (re.compile(r"model.?not.?found|no such model", re.I), "Model Not Found"),
]
_OTHER_LABELS = [(re.compile(r"timeout|timed.?out", re.I), "Timeout"),
                 (re.compile(r"connection.?refused|connect", re.I), "Connection Error")]


def error_message(raw: str) -> str:
    """The human message of an OpenAI error body, else the raw text."""
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            err = body.get("error") or body
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])
    except (ValueError, TypeError):
        pass
    return raw


def error_label(error_type: str, message: str) -> str:
    """"504 - Gateway Timeout" for HTTP errors, "Timeout"/"Connection Error"/the exception name otherwise."""
    if error_type.startswith("HTTP Error "):
        code = error_type.split()[-1]
        if code in _CODE_LABELS:
            return f"{code} - {_CODE_LABELS[code]}"
        for pattern, label in _HTTP_MESSAGE_LABELS:
            if pattern.search(message):
                return f"{code} - {label}"
        return f"{code} - other"
    for pattern, label in _OTHER_LABELS:
        if pattern.search(message):
            return label
    return error_type.lower().strip()


def failures_by_label(failed: list[RequestRecord], max_messages: int = 100) -> dict[str, Any]:
    counts: dict[str, int] = defaultdict(int)
    messages: dict[str, list[str]] = defaultdict(list)
    for rec in failed:
        msg = error_message(rec.error_msg or "")
        label = error_label(rec.error_type or "error", msg)
        counts[label] += 1
        if msg not in messages[label] and len(messages[label]) < max_messages:
            messages[label].append(msg)
    return {label: {"count": counts[label], "messages": [{"message": m} for m in messages[label]]}
            for label in sorted(counts, key=lambda k: -counts[k])}


# ---------------------------------------------------------------- a set of requests

def _token_summary(values: list[float], percentiles: list[float], **head: float) -> dict[str, float]:
    out = dict(head)
    out.update(summarize(values, percentiles) or {})
    return out


def summarize_requests(records: list[RequestRecord], tok: Optional[BenchTokenizer],
                       percentiles: list[float] = DEFAULT_PERCENTILES, stage_rate: Optional[float] = None,
                       stage_concurrency: Optional[int] = None, use_server_output_tokens: bool = False,
                       max_error_messages: int = 100) -> dict[str, Any]:
    """inference-perf's lifecycle report (summary_lifecycle_metrics.json / stage_N_...json)."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    window = max(r.end_time for r in records) - min(r.start_time for r in records) if records else 0.0
    schedule = [r.start_time - r.scheduled_time for r in records]
    load: dict[str, Any] = {"count": len(records), "schedule_delay": summarize(schedule, percentiles)}
    if stage_rate is not None and records:
        send = max(r.start_time for r in records) - min(r.start_time for r in records)
        load.update(send_duration=send, requested_rate=stage_rate,
                    achieved_rate=len(records) / send if send > 0 else 0.0)
        if stage_concurrency is not None:
            load["concurrency"] = stage_concurrency

    lat: dict[str, list[float]] = defaultdict(list)
    itl: list[float] = []
    mismatches = 0
    for rec in ok:
        stamps = token_times(rec, tok)
        mismatches += token_count_mismatch(rec, tok)
        m = request_metrics(rec, stamps, use_server_output_tokens)
        for key in ("request_latency", "normalized_time_per_output_token", "time_to_first_token", "time_per_output_token"):
            if m[key] is not None:
                lat[key].append(m[key])
        itl.extend(m["inter_token_latency_deltas"])

    in_total = float(sum(r.input_tokens for r in ok))
    out_total = float(sum(effective_output_tokens(r, use_server_output_tokens) for r in ok))

    def rate(x: float) -> float:
        return x / window if window > 0 else 0.0

    server_out = [float((r.server_usage or {}).get("completion_tokens", r.output_tokens)) for r in ok]
    cached = float(sum(((r.server_usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for r in ok))
    successes = {
        "count": len(ok),
        "latency": {
            "request_latency": summarize(lat["request_latency"], percentiles),
            "normalized_time_per_output_token": summarize(lat["normalized_time_per_output_token"], percentiles),
            "time_per_output_token": summarize(lat["time_per_output_token"], percentiles),
            "time_to_first_token": summarize(lat["time_to_first_token"], percentiles),
            "inter_token_latency": summarize(itl, percentiles),
        },
        "throughput": {
            "input_tokens_per_sec": rate(in_total),
            "output_tokens_per_sec": rate(out_total),
            "total_tokens_per_sec": rate(in_total + out_total),
            "requests_per_sec": rate(len(ok)),
        },
        "request_size_bytes": summarize([float(len(r.request_data.encode())) for r in ok], percentiles),
        "prompt_tokens": _token_summary([float(r.input_tokens) for r in ok], percentiles, total=in_total,
                                        cached=cached, uncached=max(in_total - cached, 0.0)),
        "output_len": summarize([float(r.output_tokens) for r in ok], percentiles),
        "output_tokens": _token_summary(server_out, percentiles, total=float(sum(server_out))),
        "token_count_mismatches": mismatches,
        "client_fallback_requests": {
            "prompt": sum(1 for r in ok if (r.server_usage or {}).get("prompt_tokens") is None),
            "output": sum(1 for r in ok if (r.server_usage or {}).get("completion_tokens") is None),
        },
    }
    failed_in = float(sum(r.input_tokens for r in failed))
    failures = {
        "count": len(failed),
        "request_latency": summarize([r.end_time - r.start_time for r in failed], percentiles),
        "prompt_tokens": _token_summary([float(r.input_tokens) for r in failed], percentiles, total=failed_in,
                                        cached=0.0, uncached=failed_in),
        "by_label": failures_by_label(failed, max_error_messages),
    }
    return {"benchmark_time_seconds": window, "load_summary": load, "successes": successes, "failures": failures}


def per_request_entry(rec: RequestRecord, tok: Optional[BenchTokenizer], fields: Any = None,
                      use_server_output_tokens: bool = False) -> dict[str, Any]:
    """One element of per_request_lifecycle_metrics.json."""
    stamps = token_times(rec, tok) if rec.ok else list(rec.chunk_times)
    response_metrics: dict[str, Any] = {"output_tokens": rec.output_tokens, "server_usage": rec.server_usage}
    if rec.streamed:
        response_metrics.update(chunk_times=rec.chunk_times, output_token_times=stamps)
        if fields is None or fields.response_chunks:
            response_metrics["response_chunks"] = rec.response_chunks
    info = {"request_metrics": {"text": {"input_tokens": rec.input_tokens}},
            "response_metrics": response_metrics if rec.ok else None,
            "input_tokens": rec.input_tokens}
    entry: dict[str, Any] = {"start_time": rec.start_time, "end_time": rec.end_time}
    if fields is None or fields.request:
        entry["request"] = rec.request_data
    if fields is None or fields.response:
        entry["response"] = rec.response_data
    if fields is None or fields.info:
        entry["info"] = info
    if rec.ok and fields is not None and fields.computed_metrics:
        m = request_metrics(rec, stamps, use_server_output_tokens)
        entry["computed_metrics"] = {
            **{k: v for k, v in m.items() if k != "inter_token_latency_deltas"},
            "inter_token_latencies": m["inter_token_latency_deltas"],
            "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens,
        }
    entry["error"] = None if rec.ok else {"error_type": rec.error_type, "error_msg": rec.error_msg}
    return entry
