"""One typed-config mechanism: every surface (bench workload, deploy spec, router plugin parameters,
engine arguments and `wideep serve` flags, KV transfer / KV events config) rejects the same bad value
the same way: a ConfigError whose field is the path of the value and whose message says what it must be."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import yaml

from wideep.bench.config import parse_config
from wideep.deploy.spec import spec_from_dict
from wideep.engine.config import EngineArgs
from wideep.engine.kv_events import KVEventsConfig
from wideep.errors import ConfigError, WideepError
from wideep.kv_transfer.params import KVTransferConfig
from wideep.router.registry import create

ROOT = Path(__file__).resolve().parents[2]
BENCH = {"load": {"type": "concurrent", "stages": [{"concurrency_level": 2, "num_requests": 4}]},
         "server": {"base_url": "http://127.0.0.1:1"},
         "data": {"type": "random", "input_distribution": {"min": 1, "max": 1, "mean": 1, "std_dev": 0},
                  "output_distribution": {"min": 1, "max": 1, "mean": 1, "std_dev": 0}}}


def _bench(value):
    d = copy.deepcopy(BENCH)
    d["load"]["worker_max_concurrency"] = value
    return parse_config(d).load.worker_max_concurrency


def _deploy(value):
    d = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    d["prefill"]["replicas"] = value
    return spec_from_dict(d).prefill.replicas


def _deploy_engine_args(value):
    d = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    d["decode"].setdefault("engine_args", {})["max-num-seqs"] = value
    spec_from_dict(d)
    return int(value)


def _router(value):
    return create("prefix-cache-scorer", "p", {"blockSizeTokens": value}).params.block_size_tokens


def _engine(value):
    return EngineArgs.from_dict({"max_num_seqs": value}).max_num_seqs


def _kv_events(value):
    return KVEventsConfig.from_dict({"buffer_steps": value}).buffer_steps


SURFACES = {  # surface -> (build with one int field set to value, that field's path)
    "bench": (_bench, "load.worker_max_concurrency"),
    "deploy": (_deploy, "prefill.replicas"),
    "deploy engine_args": (_deploy_engine_args, "decode.engine_args.max-num-seqs"),
    "router plugin": (_router, "plugin 'p' (type prefix-cache-scorer).blockSizeTokens"),
    "engine args": (_engine, "max_num_seqs"),
    "kv events": (_kv_events, "kv_events_config.buffer_steps"),
}


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("bad", ["8", True, 8.5, None, [8], {"n": 8}])
def test_the_same_bad_int_is_rejected_the_same_way(surface, bad):
    fn, path = SURFACES[surface]
    with pytest.raises(ConfigError) as exc:
        fn(bad)
    assert isinstance(exc.value, WideepError)
    assert exc.value.field == path
    assert exc.value.message == f"must be int, got {bad!r}"
    assert str(exc.value) == f"{path}: must be int, got {bad!r}"


@pytest.mark.parametrize("surface", SURFACES)
def test_an_integral_float_is_an_int_everywhere(surface):
    fn, _ = SURFACES[surface]
    assert fn(8.0) == 8 and fn(8) == 8


@pytest.mark.parametrize("build,path", [
    (lambda: parse_config({**BENCH, "api": {"streamng": True}}), "api.streamng"),
    (lambda: spec_from_dict({"prefill": {"nodez": 1}}), "prefill.nodez"),
    (lambda: EngineArgs.from_dict({"max_num_seqz": 1}), "max_num_seqz"),
    (lambda: KVEventsConfig.from_dict({"endpont": "tcp://*:1"}), "kv_events_config.endpont"),
    (lambda: EngineArgs.from_dict({"eplb_config": {"windows": 1}}), "eplb_config.windows"),
])
def test_an_unknown_field_is_rejected_the_same_way(build, path):
    with pytest.raises(ConfigError) as exc:
        build()
    assert exc.value.field == path
    assert exc.value.message.startswith(f"unknown field: unknown key {path.rsplit('.', 1)[-1]!r} (known: ")


def test_literal_fields_say_their_choices():
    with pytest.raises(ConfigError) as exc:
        KVTransferConfig.from_dict({"kv_role": "kv_sender"})
    assert str(exc.value) == ("kv_transfer_config.kv_role: must be one of 'kv_producer', 'kv_consumer', "
                              "'kv_both', got 'kv_sender'")


def test_serve_flags_come_from_engine_args_and_name_the_flag(tmp_path):
    from wideep.server.args import add_serve_arguments, engine_flag_fields, serve_config_from_args

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    flags = {a.dest for a in p._actions}
    assert {f.name for f in engine_flag_fields()} <= flags
    (tmp_path / "config.json").write_text("{}")
    ns = p.parse_args([str(tmp_path), "--eplb-config", '{"window_size": "x"}'])
    with pytest.raises(ConfigError) as exc:
        serve_config_from_args(ns)
    assert str(exc.value) == "--eplb-config.window_size: must be int, got 'x'"
    ns = p.parse_args([str(tmp_path), "--eplb-config", '{"window_size": "10"}', "--cuda-graph-sizes", "1", "2",
                       "--no-enable-prefix-caching"])
    args = serve_config_from_args(ns).engine_args
    assert (args.eplb_config.window_size, args.cuda_graph_sizes, args.enable_prefix_caching) == (10, [1, 2], False)


@pytest.mark.parametrize("dist,std_dev", [
    ({"variance": 100}, 10.0),
    ({"std_dev": 200}, 200.0),
    ({}, 200.0),
    ({"std_dev": 3}, 3.0),
])
def test_bench_std_dev_has_no_sentinel(dist, std_dev):
    d = copy.deepcopy(BENCH)
    d["data"]["input_distribution"] = {"min": 1, "max": 1000, "mean": 500, **dist}
    assert parse_config(d).data.input_distribution.std_dev == std_dev


def test_bench_std_dev_200_with_variance_is_refused():
    d = copy.deepcopy(BENCH)
    d["data"]["input_distribution"] = {"min": 1, "max": 1000, "mean": 500, "std_dev": 200, "variance": 100}
    with pytest.raises(ConfigError, match="give either std_dev or variance"):
        parse_config(d)


def test_a_config_error_exits_2(tmp_path, capsys):
    from wideep.cli import main

    bad = tmp_path / "w.yaml"
    bad.write_text(yaml.safe_dump({**BENCH, "load": {**BENCH["load"], "worker_max_concurrency": "8"}}))
    assert main(["bench", "-c", str(bad)]) == 2
    assert "load.worker_max_concurrency: must be int, got '8'" in capsys.readouterr().err


def test_deploy_engine_args_reach_serve_as_flags_that_take_effect(tmp_path):
    """`enable-prefix-caching: false` in a spec must turn prefix caching off (a BooleanOptional flag)."""
    from wideep.deploy.spec import serve_flag_args
    from wideep.server.args import add_serve_arguments, serve_config_from_args

    flags = serve_flag_args({"enable-prefix-caching": False, "enforce-eager": True, "cuda_graph_sizes": [1, 2],
                             "max-num-seqs": 4})
    assert flags == ["--no-enable-prefix-caching", "--enforce-eager", "--cuda-graph-sizes", "1", "2",
                     "--max-num-seqs", "4"]
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    (tmp_path / "config.json").write_text("{}")
    args = serve_config_from_args(p.parse_args([str(tmp_path), *flags])).engine_args
    assert (args.enable_prefix_caching, args.enforce_eager, args.cuda_graph_sizes, args.max_num_seqs) == \
        (False, True, [1, 2], 4)
