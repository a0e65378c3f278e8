"""The deployment spec: examples load, the embedded default is the tiny CPU example, bad specs name the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wideep.deploy.defaults import default_spec_path
from wideep.deploy.spec import SpecError, engine_flag_args, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"tiny-cpu.yaml", "deepseek-r1-32xh200.yaml", "deepseek-r1-24xh200.yaml",
            "deepseek-r1-gb200-grove.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads(path):
    spec = load_spec(path)
    assert spec.prefill.dp_per_node * spec.prefill.nodes == spec.prefill.data_parallel_size


def test_embedded_default_is_the_tiny_example():
    assert default_spec_path().read_text() == (ROOT / "examples" / "tiny-cpu.yaml").read_text()
    spec = load_spec(default_spec_path())
    assert (spec.prefill.replicas, spec.prefill.data_parallel_size) == (1, 2)
    assert (spec.decode.replicas, spec.decode.data_parallel_size) == (1, 2)
    assert spec.gateway.mode == "builtin" and spec.cluster.accelerator == "cpu"
    assert spec.model.make_tiny


def test_seed_shapes():
    s32 = load_spec(ROOT / "examples" / "deepseek-r1-32xh200.yaml")
    assert (s32.prefill.nodes, s32.prefill.data_parallel_size, s32.prefill.dp_per_node) == (2, 16, 8)
    assert (s32.decode.nodes, s32.decode.data_parallel_size) == (2, 16)
    s24 = load_spec(ROOT / "examples" / "deepseek-r1-24xh200.yaml")
    assert (s24.prefill.data_parallel_size, s24.decode.nodes, s24.decode.dp_per_node) == (8, 2, 8)
    gb = load_spec(ROOT / "examples" / "deepseek-r1-gb200-grove.yaml")
    assert (gb.prefill.dp_per_node, gb.decode.nodes, gb.decode.data_parallel_size) == (4, 8, 32)


def _base() -> dict:
    return yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(replicaz=1), "replicaz"),
    (lambda d: d["prefill"].update(nodez=2), "prefill.nodez"),
    (lambda d: d["decode"]["resources"].update(gpu=1) if "resources" in d["decode"]
     else d["decode"].update(resources={"gpu": 1}), "decode.resources.gpu"),
    (lambda d: d["decode"].update(nodes=3, data_parallel_size=8), "decode.data_parallel_size"),
    (lambda d: d["prefill"].update(nodes=1, data_parallel_size=16), "prefill.data_parallel_size"),
    (lambda d: d["gateway"].update(mode="nginx"), "gateway.mode"),
    (lambda d: d["prefill"].update(replicas="two"), "prefill.replicas"),
    (lambda d: d["prefill"]["engine_args"].update({"max-num-seqz": 4}), "prefill.engine_args.max-num-seqz"),
    (lambda d: d["prefill"].update(supervisor_port=8001), "prefill.supervisor_port"),
    (lambda d: d.update(name="Bad_Name"), "name"),
])
def test_bad_spec_names_the_field(mutate, field):
    d = _base()
    mutate(d)
    with pytest.raises(SpecError) as exc:
        spec_from_dict(d)
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ":")


def test_more_than_8_ranks_per_node_says_why():
    d = _base()
    d["prefill"].update(nodes=1, data_parallel_size=16)
    with pytest.raises(SpecError, match=r"16 ranks per node.*at most 8"):
        spec_from_dict(d)


def test_uneven_split_says_why():
    d = _base()
    d["decode"].update(nodes=3, data_parallel_size=8)
    with pytest.raises(SpecError, match=r"cannot be split evenly over decode.nodes=3"):
        spec_from_dict(d)


def test_bad_file_via_cli_names_the_field(tmp_path):
    from wideep.cli import main

    d = _base()
    d["decode"]["sidecarport"] = 1
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(SystemExit) as exc:
        main(["render", "-f", str(p)])
    assert "decode.sidecarport: unknown field" in str(exc.value)


def test_engine_flag_args():
    assert engine_flag_args({"max-num-seqs": 256, "enable_dbo": True, "x": False,
                             "kv-events-config": {"a": 1}}) == [
        "--max-num-seqs", "256", "--enable-dbo", "--kv-events-config", '{"a":1}']


def test_deploy_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, wideep.deploy.cli, wideep.deploy.launcher, wideep.deploy.status;"
            "from wideep.deploy.spec import load_spec; from wideep.deploy.render import render_bundle;"
            f"render_bundle(load_spec({str(ROOT / 'examples' / 'tiny-cpu.yaml')!r}));"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
