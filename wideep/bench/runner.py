"""One benchmark run end to end: config -> load -> reports (inference-perf JSON, BR v0.2) -> plots."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import yaml

from .config import BenchConfig, ConfigError
from .datagen import make_datagen
from .loadgen import LoadGenerator, StageResult
from .metrics import per_request_entry, request_metrics, summarize_requests, token_times
from .plots import REQUEST_METRICS_FILE, load_run, plot_runs
from .report_br import benchmark_report
from .tokenizer import BenchTokenizer


@dataclass
class RunOptions:
    base_url: Optional[str] = None
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    output: Optional[str] = None
    progress: bool = True
    plots: bool = True
    gpus: int = 1
    label: Optional[str] = None
    seed: Optional[int] = None


def apply_overrides(cfg: BenchConfig, opts: RunOptions) -> BenchConfig:
    cfg = dataclasses.replace(cfg)
    if opts.base_url:
        from .config import ServerConfig

        cfg.server = dataclasses.replace(cfg.server or ServerConfig(), base_url=opts.base_url)
    if opts.model and cfg.server:
        cfg.server = dataclasses.replace(cfg.server, model_name=opts.model)
    if opts.tokenizer:
        from .config import TokenizerConfig

        cfg.tokenizer = TokenizerConfig(pretrained_model_name_or_path=opts.tokenizer)
    if "${" in (cfg.server.base_url if cfg.server else ""):
        raise ConfigError(f"server.base_url: {cfg.server.base_url!r} has an unset placeholder; "
                          "export it (envsubst) or pass --base-url")
    return cfg


def output_dir(cfg: BenchConfig, opts: RunOptions) -> Path:
    raw = opts.output or (cfg.storage.local_storage.path if cfg.storage else None) or "reports-{timestamp}"
    return Path(raw.replace("{timestamp}", datetime.now().strftime("%Y%m%d-%H%M%S")))


async def _model_name(cfg: BenchConfig) -> str:
    if cfg.server.model_name:
        return cfg.server.model_name
    import aiohttp

    url = cfg.server.base_url.rstrip("/") + "/v1/models"
    headers = {"Authorization": f"Bearer {cfg.server.api_key}"} if cfg.server.api_key else {}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as r:
                body = await r.json()
        return body["data"][0]["id"]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"server.model_name is unset and GET {url} did not name a model ({exc}); "
                          "set server.model_name or --model") from None


def _tokenizer(cfg: BenchConfig, model: Optional[str]) -> Optional[BenchTokenizer]:
    """tokenizer.pretrained_model_name_or_path, else the served model name (as inference-perf falls back)."""
    name = (cfg.tokenizer.pretrained_model_name_or_path if cfg.tokenizer else None) or model
    if name is None:
        if cfg.data.type == "mock":
            return None
        raise ConfigError("tokenizer.pretrained_model_name_or_path: missing (or pass --tokenizer DIR)")
    return BenchTokenizer(name)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def write_reports(cfg: BenchConfig, stages: list[StageResult], tok, out: Path, *, label: str, gpus: int) -> dict:
    """Everything a run leaves on disk; returns the summary dict."""
    rl = cfg.report.request_lifecycle
    pct = rl.percentiles
    use_server = rl.use_server_output_tokens
    out.mkdir(parents=True, exist_ok=True)
    records = [r for s in stages for r in s.records if r.stage_id >= 0]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    summary = summarize_requests(records, tok, pct, use_server_output_tokens=use_server,
                                 max_error_messages=rl.max_error_messages) if records else {}
    if rl.summary and records:
        _write_json(out / "summary_lifecycle_metrics.json", summary)
    eid = f"wideep-bench-{uuid.uuid4().hex[:8]}"
    for s in stages:
        if not s.records:
            continue
        stage_summary = summarize_requests(s.records, tok, pct, stage_rate=s.rate, stage_concurrency=s.concurrency,
                                           use_server_output_tokens=use_server, max_error_messages=rl.max_error_messages)
        # plots and compare read the stage files, so they are always written (inference-perf's default too)
        _write_json(out / f"stage_{s.stage_id}_lifecycle_metrics.json", stage_summary)
        br = benchmark_report(s.records, tok, cfg, stage_id=s.stage_id, concurrency=s.concurrency, rate_qps=s.rate,
                              eid=eid, wall_start=s.wall_start, wall_end=s.wall_end)
        (out / f"benchmark_report_v0.2_stage_{s.stage_id}.yaml").write_text(yaml.safe_dump(br, sort_keys=True))
    if rl.per_request:
        _write_json(out / "per_request_lifecycle_metrics.json",
                    [per_request_entry(r, tok, rl.per_request_fields, use_server) for r in records])
    compact = []
    for r in records:
        row = {"stage_id": r.stage_id, "start_time": r.start_time, "end_time": r.end_time, "ok": r.ok,
               "input_tokens": r.input_tokens, "output_tokens": r.output_tokens}
        if r.ok:
            m = request_metrics(r, token_times(r, tok), use_server)
            row.update({k: v for k, v in m.items() if k != "inter_token_latency_deltas"})
        compact.append(row)
    _write_json(out / REQUEST_METRICS_FILE, compact)
    _write_json(out / "wideep_run.json", {"label": label, "gpus": gpus,
                                          "stages": [{"stage_id": s.stage_id, "kind": s.kind, "rate": s.rate,
                                                      "concurrency": s.concurrency, "duration": s.duration,
                                                      "wall_start": s.wall_start, "wall_end": s.wall_end} for s in stages]})
    return summary


def print_summary(summary: dict, label: str) -> None:
    if not summary:
        print(f"{label}: no requests were sent")
        return
    ok, fail = summary["successes"], summary["failures"]
    lat, thr = ok["latency"], ok["throughput"]

    def med(key):
        d = lat.get(key) or {}
        return f"{d.get('median', float('nan')):.4f}" if d else "-"

    print(f"=== {label} ===")
    print(f"requests: {ok['count']} ok, {fail['count']} failed"
          + (f" {dict((k, v['count']) for k, v in fail['by_label'].items())}" if fail["count"] else ""))
    print(f"throughput: {thr['output_tokens_per_sec']:.1f} output tok/s, {thr['input_tokens_per_sec']:.1f} input tok/s, "
          f"{thr['requests_per_sec']:.2f} req/s")
    print(f"p50: TTFT {med('time_to_first_token')} s, TPOT {med('time_per_output_token')} s/tok, "
          f"NTPOT {med('normalized_time_per_output_token')} s/tok, ITL {med('inter_token_latency')} s, "
          f"latency {med('request_latency')} s; token_count_mismatches {ok['token_count_mismatches']}")


def run_benchmark(cfg: BenchConfig, opts: RunOptions, name: str = "bench") -> Path:
    """Run one workload; returns the directory holding its reports."""
    from .progress import make_progress

    cfg = apply_overrides(cfg, opts)
    model = asyncio.run(_model_name(cfg))
    tok = _tokenizer(cfg, model)
    seed = opts.seed if opts.seed is not None else cfg.load.base_seed
    if seed is None:
        seed = int(time.time() * 1000)
    prompts = make_datagen(cfg, tok, seed).prompts()
    out = output_dir(cfg, opts)
    label = opts.label or name

    async def go():
        with make_progress(opts.progress) as progress:
            return await LoadGenerator(cfg, tok, prompts, model, progress, seed).run()

    try:
        import uvloop

        stages = uvloop.run(go())
    except ImportError:
        stages = asyncio.run(go())
    summary = write_reports(cfg, stages, tok, out, label=label, gpus=opts.gpus)
    print_summary(summary, label)
    if opts.plots and summary:
        plot_runs([load_run(out, label)], out / "plots")
    print(f"reports: {out}")
    return out
