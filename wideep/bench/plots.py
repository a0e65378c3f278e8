"""PNG plots of one or several runs (matplotlib, Agg): latency vs load, throughput vs latency with
its Pareto front, TTFT/TPOT CDFs, output tokens/s per GPU. Several runs are overlaid, one colour each.

A run here is a `RunData`: its label, its stage summaries and its per-request metrics, as read
back from a run directory by `load_run`, so the same code plots a fresh run and a comparison.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUEST_METRICS_FILE = "wideep_request_metrics.json"


@dataclass
class RunData:
    label: str
    stages: list[dict[str, Any]]  # stage_N lifecycle dicts, each with "stage_id" and "gpus" added
    requests: list[dict[str, Any]] = field(default_factory=list)  # wideep_request_metrics.json entries
    gpus: int = 1


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Read a run directory written by `wideep bench` (or real inference-perf: stage files only)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a run directory")
    stages = []
    for f in sorted(p.glob("stage_*_lifecycle_metrics.json"), key=lambda f: int(f.name.split("_")[1])):
        d = json.loads(f.read_text())
        d["stage_id"] = int(f.name.split("_")[1])
        stages.append(d)
    if not stages and (p / "summary_lifecycle_metrics.json").exists():
        d = json.loads((p / "summary_lifecycle_metrics.json").read_text())
        d["stage_id"] = 0
        stages.append(d)
    if not stages:
        raise FileNotFoundError(f"{p}: no stage_N_lifecycle_metrics.json or summary_lifecycle_metrics.json")
    meta = json.loads((p / "wideep_run.json").read_text()) if (p / "wideep_run.json").exists() else {}
    reqs = json.loads((p / REQUEST_METRICS_FILE).read_text()) if (p / REQUEST_METRICS_FILE).exists() else []
    return RunData(label or meta.get("label") or p.name, stages, reqs, int(meta.get("gpus", 1)))


def _load_axis(stage: dict) -> tuple[float, str]:
    ls = stage.get("load_summary") or {}
    if ls.get("concurrency") is not None:
        return float(ls["concurrency"]), "concurrency"
    if ls.get("requested_rate") is not None:
        return float(ls["requested_rate"]), "requested rate (req/s)"
    return float(stage.get("stage_id", 0)), "stage"


def _lat(stage: dict, metric: str, stat: str = "median") -> float | None:
    d = ((stage.get("successes") or {}).get("latency") or {}).get(metric) or {}
    return d.get(stat)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by any other, for lower-is-better x (latency) and higher-is-better y."""
    front = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[RunData], out_dir: str | Path) -> list[Path]:
    """Write the plot set for these runs into out_dir; returns the files written."""
    plt = _figure()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    # latency vs load
    metrics = [("time_to_first_token", "TTFT (s)"), ("time_per_output_token", "TPOT (s/token)"),
               ("normalized_time_per_output_token", "NTPOT (s/token)"), ("request_latency", "request latency (s)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    xlabel = "load"
    for i, run in enumerate(runs):
        xs = [_load_axis(s) for s in run.stages]
        xlabel = xs[0][1] if xs else xlabel
        for ax, (key, title) in zip(axes.flat, metrics):
            pts = [(x, _lat(s, key), _lat(s, key, "p90")) for (x, _), s in zip(xs, run.stages)]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[i % len(colors)], label=f"{run.label} p50")
                ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=colors[i % len(colors)], alpha=0.6,
                        label=f"{run.label} p90")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
    axes.flat[0].legend(fontsize=7)
    save(fig, "latency_vs_load.png")

    # throughput vs latency with the Pareto front, and output tokens/s per GPU
    fig, ax = plt.subplots(figsize=(7, 5))
    fig2, ax2 = plt.subplots(figsize=(7, 5))
    all_pts = []
    for i, run in enumerate(runs):
        pts = []
        for s in run.stages:
            tpot = _lat(s, "time_per_output_token") or _lat(s, "normalized_time_per_output_token")
            thr = ((s.get("successes") or {}).get("throughput") or {}).get("output_tokens_per_sec", 0.0) / max(run.gpus, 1)
            if tpot is not None:
                pts.append((tpot, thr))
        c = colors[i % len(colors)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=c, label=run.label)
        all_pts += pts
        xs = [_load_axis(s)[0] for s in run.stages]
        thr = [((s.get("successes") or {}).get("throughput") or {}).get("output_tokens_per_sec", 0.0) / max(run.gpus, 1)
               for s in run.stages]
        ax2.plot(xs, thr, "o-", color=c, label=f"{run.label} ({run.gpus} GPU)")
        ax2.set_xlabel(_load_axis(run.stages[0])[1] if run.stages else "load")
    front = pareto_front(all_pts)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="magenta", lw=2, label="Pareto front")
    ax.set_xlabel("TPOT p50 (s/token)")
    ax.set_ylabel("output tokens/s per GPU")
    ax.legend(fontsize=8)
    save(fig, "throughput_vs_latency.png")
    ax2.set_ylabel("output tokens/s per GPU")
    ax2.legend(fontsize=8)
    save(fig2, "output_tokens_per_gpu.png")

    # CDFs
    for key, name, title in (("time_to_first_token", "ttft_cdf.png", "TTFT (s)"),
                             ("time_per_output_token", "tpot_cdf.png", "TPOT (s/token)")):
        fig, ax = plt.subplots(figsize=(7, 5))
        for i, run in enumerate(runs):
            vals = sorted(r[key] for r in run.requests if r.get(key) is not None)
            if vals:
                ys = [(j + 1) / len(vals) for j in range(len(vals))]
                ax.step(vals, ys, where="post", color=colors[i % len(colors)], label=run.label)
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        if any(run.requests for run in runs):
            ax.legend(fontsize=8)
        save(fig, name)
    return written
