"""The workload file: inference-perf's format, llm-d's template, strict keys."""
from __future__ import annotations

from pathlib import Path

import pytest

from wideep.bench.config import ConfigError, load_workloads, parse_config
from wideep.bench.runner import RunOptions, apply_overrides

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples/bench/2048_concurrent_2k_isl_2k_osl.yaml"


def test_seed_template_parses_and_picks_its_workload(monkeypatch):
    monkeypatch.setenv("IP", "10.1.2.3")
    monkeypatch.setenv("NAMESPACE", "llm-d")
    workloads = load_workloads(TEMPLATE)
    assert list(workloads) == ["2048_concurrent_2k_isl_2k_osl"]
    cfg = workloads["2048_concurrent_2k_isl_2k_osl"]
    assert cfg.load.type == "concurrent"
    assert (cfg.load.stages[0].concurrency_level, cfg.load.stages[0].num_requests) == (2048, 8192)
    assert cfg.api.type == "completion" and cfg.api.streaming
    assert cfg.server.base_url == "http://10.1.2.3:80" and cfg.server.model_name == "deepseek-ai/DeepSeek-R1-0528"
    assert cfg.server.ignore_eos
    assert cfg.data.type == "random" and cfg.data.input_distribution.mean == 2000
    assert cfg.data.output_distribution.std_dev == 0 and cfg.report.request_lifecycle.summary
    assert cfg.storage.local_storage.path == "/workspace"
    assert load_workloads(TEMPLATE, "2048_concurrent_2k_isl_2k_osl")
    with pytest.raises(ConfigError, match="no workload named 'nope'"):
        load_workloads(TEMPLATE, "nope")


def test_unset_placeholder_is_reported_unless_overridden(monkeypatch):
    monkeypatch.delenv("IP", raising=False)
    cfg = load_workloads(TEMPLATE)["2048_concurrent_2k_isl_2k_osl"]
    with pytest.raises(ConfigError, match="server.base_url"):
        apply_overrides(cfg, RunOptions())
    assert apply_overrides(cfg, RunOptions(base_url="http://127.0.0.1:1")).server.base_url == "http://127.0.0.1:1"


PLAIN_INFERENCE_PERF = """\
load:
  type: concurrent
  stages:
    - concurrency_level: 16
      num_requests: 160
  num_workers: 2
api:
  type: completion
  streaming: true
server:
  type: vllm
  model_name: fake/model
  base_url: http://127.0.0.1:18000
  ignore_eos: true
tokenizer:
  pretrained_model_name_or_path: ./offline-tokenizer
data:
  type: random
  input_distribution: {min: 200, max: 200, mean: 200, std_dev: 0}
  output_distribution: {min: 100, max: 100, mean: 100, std_dev: 0}
report:
  request_lifecycle:
    summary: true
    per_stage: true
    per_request: true
storage:
  local_storage:
    path: ./inference-perf-report
"""


def test_plain_inference_perf_config_parses(tmp_path):
    """A plain inference-perf config file (not the llm-d template form) is one workload named after the file."""
    path = tmp_path / "inference-perf-concurrent.yaml"
    path.write_text(PLAIN_INFERENCE_PERF)
    (name, cfg), = load_workloads(path).items()
    assert name == "inference-perf-concurrent" and cfg.load.num_workers == 2
    assert cfg.report.request_lifecycle.per_request


BASE = {"load": {"type": "concurrent", "stages": [{"concurrency_level": 2, "num_requests": 4}]},
        "server": {"base_url": "http://127.0.0.1:1"},
        "data": {"type": "random", "input_distribution": {"min": 1, "max": 1, "mean": 1, "std_dev": 0},
                 "output_distribution": {"min": 1, "max": 1, "mean": 1, "std_dev": 0}}}


def _with(path, value):
    import copy

    d = copy.deepcopy(BASE)
    node = d
    for key in path[:-1]:
        node = node[key] if not isinstance(key, int) else node[key]
    node[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,needle", [
    (("load", "stages", 0, "concurency_level"), 3, "load.stages[0].concurency_level"),
    (("api",), {"streamming": True}, "api.streamming"),
    (("servr",), {}, "'servr'"),
    (("data", "input_distribution", "stdev"), 1, "data.input_distribution.stdev"),
    (("report",), {"request_lifecycle": {"per_stag": True}}, "report.request_lifecycle.per_stag"),
])
def test_unknown_key_is_an_error_naming_the_key(path, value, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(_with(path, value))
    assert needle in str(err.value)


@pytest.mark.parametrize("path,value,needle", [
    (("load", "type"), "trace_replay", "load.type"),
    (("data", "input_distribution", "type"), "zipf", "data.input_distribution.type"),
    (("api",), {"streaming": "yes"}, "api.streaming"),
    (("load", "stages"), [{"rate": 1, "duration": 1}], "load.stages[0]"),
])
def test_bad_values_name_the_field(path, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_config(_with(path, value))


def test_template_with_a_stray_section_names_it(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("harness: {name: x}\nworkloads_typo: {}\nworkload: {a: {}}\n")
    with pytest.raises(ConfigError, match="workloads_typo"):
        load_workloads(f)


def test_cli_reports_bad_config_naming_the_key(tmp_path, capsys):
    import yaml

    from wideep.cli import main

    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_with(("load", "sweeep"), {})))
    assert main(["bench", "-c", str(f), "--no-progress"]) == 2
    assert "load.sweeep" in capsys.readouterr().err
