"""Two (or more) runs side by side: a table of the headline metrics and overlaid plots."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .plots import RunData, load_run, plot_runs

ROWS = [
    ("requests ok", ("successes", "count"), None),
    ("requests failed", ("failures", "count"), None),
    ("output tok/s", ("successes", "throughput", "output_tokens_per_sec"), None),
    ("output tok/s/GPU", ("successes", "throughput", "output_tokens_per_sec"), "per_gpu"),
    ("input tok/s", ("successes", "throughput", "input_tokens_per_sec"), None),
    ("requests/s", ("successes", "throughput", "requests_per_sec"), None),
    ("TTFT p50 (s)", ("successes", "latency", "time_to_first_token", "median"), None),
    ("TTFT p99 (s)", ("successes", "latency", "time_to_first_token", "p99"), None),
    ("TPOT p50 (s)", ("successes", "latency", "time_per_output_token", "median"), None),
    ("TPOT p99 (s)", ("successes", "latency", "time_per_output_token", "p99"), None),
    ("NTPOT p50 (s)", ("successes", "latency", "normalized_time_per_output_token", "median"), None),
    ("ITL p50 (s)", ("successes", "latency", "inter_token_latency", "median"), None),
    ("ITL p99 (s)", ("successes", "latency", "inter_token_latency", "p99"), None),
    ("latency p50 (s)", ("successes", "latency", "request_latency", "median"), None),
    ("token mismatches", ("successes", "token_count_mismatches"), None),
]


def _get(d: dict, path: tuple) -> Optional[float]:
    for key in path:
        if not isinstance(d, dict) or d.get(key) is None:
            return None
        d = d[key]
    return d


def comparison_table(runs: list[RunData]) -> list[list[str]]:
    """Rows of [stage, metric, value per run..., delta % of the last run against the first]."""
    rows = []
    n_stages = max(len(r.stages) for r in runs)
    for i in range(n_stages):
        for name, path, mode in ROWS:
            vals = []
            for run in runs:
                v = _get(run.stages[i], path) if i < len(run.stages) else None
                if v is not None and mode == "per_gpu":
                    v = v / max(run.gpus, 1)
                vals.append(v)
            cells = [("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))) for v in vals]
            a, b = vals[0], vals[-1]
            delta = f"{(b - a) / a * 100:+.1f}%" if a not in (None, 0) and b is not None else ""
            rows.append([str(runs[0].stages[i]["stage_id"] if i < len(runs[0].stages) else i), name, *cells, delta])
    return rows


def print_table(runs: list[RunData], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="wideep bench compare")
        for col in ["stage", "metric", *[r.label for r in runs], "delta"]:
            t.add_column(col, justify="right" if col not in ("metric",) else "left")
        for row in rows:
            t.add_row(*row)
        Console(width=160).print(t)
    except ImportError:  # rich is optional
        for row in rows:
            print("\t".join(row))


def compare_runs(paths: list[str | Path], out_dir: str | Path, labels: Optional[list[str]] = None) -> Path:
    """Load each run directory, print the table, write comparison.csv and overlaid plots to out_dir."""
    labels = labels or [None] * len(paths)
    runs = [load_run(p, lab) for p, lab in zip(paths, labels)]
    seen: dict[str, int] = {}
    for r in runs:  # two runs with the same directory name still need two legend entries
        if r.label in seen:
            seen[r.label] += 1
            r.label = f"{r.label}#{seen[r.label]}"
        else:
            seen[r.label] = 0
    rows = comparison_table(runs)
    print_table(runs, rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = ["stage", "metric", *[r.label for r in runs], "delta"]
    (out / "comparison.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    plot_runs(runs, out)
    print(f"comparison: {out}")
    return out
