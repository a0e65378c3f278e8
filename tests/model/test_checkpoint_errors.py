"""Malformed checkpoints fail with a message that names the file and the tensor (or field)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wideep.model.config import CheckpointError
from wideep.model.loader import load_model

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture
def broken(tiny_model_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, d)
    return d


def _rewrite_shard(d, edit):
    tensors = load_file(str(d / SHARD))
    edit(tensors)
    save_file(tensors, str(d / SHARD), metadata={"format": "pt"})


def test_missing_tensor_named_with_its_file(broken):
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    _rewrite_shard(broken, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as exc:
        load_model(broken)
    assert name in str(exc.value) and SHARD in str(exc.value)


def test_missing_tensor_absent_from_index(broken):
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        load_model(broken)
    assert name in str(exc.value) and "model.safetensors.index.json" in str(exc.value)


def test_wrong_shape_named_with_its_file(broken):
    name = "model.layers.1.mlp.gate.weight"
    _rewrite_shard(broken, lambda t: t.__setitem__(name, torch.zeros(15, 256, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError) as exc:
        load_model(broken)
    msg = str(exc.value)
    assert name in msg and SHARD in msg and "[15, 256]" in msg and "[16, 256]" in msg


def test_missing_shard_file(broken):
    (broken / SHARD).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_model(broken)
    assert SHARD in str(exc.value) and "model.safetensors.index.json" in str(exc.value)


def test_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        load_model(broken)
    msg = str(exc.value)
    assert "config.json" in msg and "LlamaForCausalLM" in msg and "architectures" in msg


def test_single_file_checkpoint_without_index_loads(broken):
    (broken / "model.safetensors.index.json").unlink()
    shutil.move(broken / SHARD, broken / "model.safetensors")
    assert load_model(broken).num_layers == 4
