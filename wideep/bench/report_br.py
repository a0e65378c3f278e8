"""llm-d Benchmark Report v0.2 (the shape of seed 001 and of inference-perf.partial.stage_N.yaml).

Every distribution is {units, mean, stddev, min, p0p1, p1, p5, p10, p25, p50, p75, p90, p95, p99,
p99p9, max}; the metrics are those of metrics.py, so this report and the lifecycle JSON agree.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from typing import Any, Optional

import numpy as np

from .config import BenchConfig
from .metrics import effective_output_tokens, request_metrics, token_times
from .records import RequestRecord
from .tokenizer import BenchTokenizer

PERCENTILES = [0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9]
KEYS = ["p0p1", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99", "p99p9"]
VERSION = "0.2"


def statistics(values: list[float], units: str) -> Optional[dict[str, Any]]:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return None
    out: dict[str, Any] = {"units": units, "mean": float(arr.mean())}
    if arr.size > 1:
        out["stddev"] = float(arr.std(ddof=1))
    out["min"] = float(arr.min())
    out.update({k: float(v) for k, v in zip(KEYS, np.percentile(arr, PERCENTILES))})
    out["max"] = float(arr.max())
    return out


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def aggregate(records: list[RequestRecord], tok: Optional[BenchTokenizer], use_server: bool = False) -> dict[str, Any]:
    """results.request_performance.aggregate for one set of requests."""
    ok = [r for r in records if r.ok]
    lat: dict[str, list[float]] = {k: [] for k in ("request_latency", "time_to_first_token", "time_per_output_token",
                                                    "normalized_time_per_output_token")}
    itl: list[float] = []
    for rec in ok:
        m = request_metrics(rec, token_times(rec, tok), use_server)
        lat["request_latency"].append(m["request_latency"])
        for key in ("time_to_first_token", "time_per_output_token"):
            if m[key] is not None:
                lat[key].append(m[key])
        if effective_output_tokens(rec, use_server) > 0:
            lat["normalized_time_per_output_token"].append(m["normalized_time_per_output_token"])
        itl.extend(m["inter_token_latency_deltas"])
    out_lengths = [float(effective_output_tokens(r, use_server)) for r in ok]
    agg: dict[str, Any] = {
        "requests": _drop_none({
            "total": len(records),
            "failures": len(records) - len(ok),
            "input_length": statistics([float(r.input_tokens) for r in ok], "count"),
            "output_length": statistics(out_lengths, "count"),
        }),
        "latency": _drop_none({
            "time_to_first_token": statistics(lat["time_to_first_token"], "s"),
            "normalized_time_per_output_token": statistics(lat["normalized_time_per_output_token"], "s/token"),
            "time_per_output_token": statistics(lat["time_per_output_token"], "s/token"),
            "inter_token_latency": statistics(itl, "s/token"),
            "request_latency": statistics(lat["request_latency"], "s"),
        }),
    }
    window = max(r.end_time for r in records) - min(r.start_time for r in records) if records else 0.0
    if ok and window > 0:
        tin, tout = sum(r.input_tokens for r in ok), sum(out_lengths)
        agg["throughput"] = {
            "input_token_rate": {"units": "tokens/s", "mean": tin / window},
            "output_token_rate": {"units": "tokens/s", "mean": tout / window},
            "total_token_rate": {"units": "tokens/s", "mean": (tin + tout) / window},
            "request_rate": {"units": "queries/s", "mean": len(ok) / window},
        }
    return agg


def _seq_len(values: list[float], dist_type: str) -> dict[str, Any]:
    if not values:
        return {}
    names = {"normal": "gaussian", "fixed": "fixed", "uniform": "uniform", "lognormal": "lognormal",
             "poisson": "poisson", "skew_normal": "skew_normal"}
    return {"distribution": names.get(dist_type, "other"), "min": int(min(values)), "max": int(max(values)),
            "value": float(np.mean(values))}


def benchmark_report(records: list[RequestRecord], tok: Optional[BenchTokenizer], cfg: BenchConfig, *,
                     stage_id: int, concurrency: Optional[int], rate_qps: Optional[float], eid: str,
                     wall_start: float, wall_end: float, tool_version: str = "") -> dict[str, Any]:
    """A complete BR v0.2 document for one stage."""
    use_server = cfg.report.request_lifecycle.use_server_output_tokens
    ok = [r for r in records if r.ok]
    dist_in = cfg.data.input_distribution.type if cfg.data.input_distribution else "other"
    dist_out = cfg.data.output_distribution.type if cfg.data.output_distribution else "other"
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    start = datetime.datetime.fromtimestamp(wall_start, tz=datetime.timezone.utc)
    end = datetime.datetime.fromtimestamp(wall_end, tz=datetime.timezone.utc)
    standardized = _drop_none({
        "tool": "wideep-bench",
        "tool_version": tool_version,
        "source": "unknown",
        "stage": stage_id,
        "parallelism": 1,
        "concurrency": concurrency,
        "rate_qps": float(rate_qps) if rate_qps is not None else None,
        "input_seq_len": _seq_len([float(r.input_tokens) for r in ok], dist_in) or None,
        "output_seq_len": _seq_len([float(effective_output_tokens(r, use_server)) for r in ok], dist_out) or None,
    })
    return {
        "version": VERSION,
        "run": {
            "uid": str(uuid.uuid4()),
            "eid": eid,
            "time": {"start": start.isoformat(), "end": end.isoformat(),
                     "duration": f"PT{max(wall_end - wall_start, 0.0):.3f}S"},
        },
        "scenario": {
            "load": {
                "metadata": {"schema_version": "0.0.1", "cfg_id": hashlib.sha256(cfg_json.encode()).hexdigest()},
                "native": {"args": {}, "config": json.loads(cfg_json)},
                "standardized": standardized,
            }
        },
        "results": {"request_performance": {"aggregate": aggregate(records, tok, use_server)}},
    }
