"""Plots render from report data; the Pareto front; the live progress panel."""
from __future__ import annotations

import io

from wideep.bench.plots import RunData, pareto_front, plot_runs
from wideep.bench.progress import LiveProgress, PlainProgress
from wideep.bench.records import RequestRecord


def test_pareto_front_keeps_only_undominated_points():
    pts = [(0.01, 100.0), (0.02, 300.0), (0.015, 90.0), (0.03, 250.0), (0.04, 400.0)]
    assert pareto_front(pts) == [(0.01, 100.0), (0.02, 300.0), (0.04, 400.0)]


def _stage(conc, ttft, tpot, thr):
    lat = lambda v: {"mean": v, "median": v, "p90": v * 1.2, "p99": v * 1.5}  # noqa: E731
    return {"stage_id": 0, "load_summary": {"concurrency": conc, "requested_rate": conc * 4},
            "successes": {"count": 10, "latency": {"time_to_first_token": lat(ttft), "time_per_output_token": lat(tpot),
                                                   "normalized_time_per_output_token": lat(tpot * 1.1),
                                                   "request_latency": lat(ttft + 100 * tpot)},
                          "throughput": {"output_tokens_per_sec": thr}}}


def test_plots_of_two_runs_render(tmp_path):
    a = RunData("pd", [_stage(c, 0.1 * c, 0.01 + 0.001 * c, 800 * c ** 0.5) for c in (1, 4, 16)],
                [{"time_to_first_token": 0.1 * i, "time_per_output_token": 0.01 * i} for i in range(1, 20)], gpus=4)
    b = RunData("agg", [_stage(c, 0.2 * c, 0.012 + 0.002 * c, 600 * c ** 0.5) for c in (1, 4, 16)], [], gpus=2)
    files = plot_runs([a, b], tmp_path)
    names = {f.name for f in files}
    assert names == {"latency_vs_load.png", "throughput_vs_latency.png", "output_tokens_per_gpu.png", "ttft_cdf.png",
                     "tpot_cdf.png"}
    for f in files:
        assert f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 5000


def test_progress_counts_and_renders(capsys):
    ok = RequestRecord(0, 0, 0, 1, "{}", True, output_tokens=7)
    bad = RequestRecord(0, 0, 0, 1, "{}", True, error_type="HTTP Error 504", error_msg="x")
    live = LiveProgress()
    live.stage_started(0, "stage 0: concurrency 2", 3)
    for rec in (ok, bad):
        live.request_started()
    live.request_started()
    for rec in (ok, bad):
        live.request_finished(rec)
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=80, force_terminal=False).print(live._render())
    text = buf.getvalue()
    assert "stage 0: concurrency 2" in text and "2 / 3" in text and "in flight" in text
    assert (live.done, live.in_flight, live.failures, live.output_tokens) == (2, 1, 1, 7)
    with PlainProgress() as plain:
        plain.stage_started(0, "stage 0", 1)
        plain.request_started()
        plain.request_finished(ok)
    assert "stage 0: done 1/1, in flight 0, failures 0" in capsys.readouterr().out
