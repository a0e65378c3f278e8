"""`wideep make-model tiny` output is a checkpoint transformers, wideep and AutoTokenizer all load offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from wideep.model.config import ModelConfig
from wideep.model.loader import load_model
from wideep.model.make_model import preset_config, tensor_specs
from wideep.model.tokenizer import Tokenizer


def test_cli_writes_a_checkpoint_that_transformers_and_wideep_load(tmp_path):
    out = tmp_path / "m"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "wideep", "make-model", "tiny", "--out", str(out), "--seed", "3"],
                   check=True, env=env, timeout=300, capture_output=True)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors.index.json", "model-00001-of-00001.safetensors"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["topk_method"] == "noaux_tc"

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().min() > 0  # non-zero: selection differs from weighting
    ours = load_model(out)
    assert torch.equal(ours.model.layers[1].mlp.gate.e_score_correction_bias, bias)


def test_tokenizer_loads_in_autotokenizer_offline_and_agrees(tiny_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ours = Tokenizer(tiny_model_dir)
    cfg = ModelConfig.from_dir(tiny_model_dir)
    assert len(hf) == ours.vocab_size == cfg.vocab_size
    assert hf.bos_token_id == ours.bos_token_id == cfg.bos_token_id
    assert hf.eos_token_id == ours.eos_token_id == cfg.eos_token_id

    text = "Hello, world! The model has 256 experts."
    assert hf(text)["input_ids"] == ours.encode(text)
    assert ours.encode(text)[0] == ours.bos_token_id

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "why?"}]
    ours_prompt = ours.apply_chat_template(msgs, add_generation_prompt=True)
    hf_prompt = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours_prompt == hf_prompt
    assert ours_prompt.startswith("<｜begin▁of▁sentence｜>be brief<｜User｜>hello there<｜Assistant｜>hi")
    assert ours_prompt.endswith("<｜User｜>why?<｜Assistant｜>")


def test_random_ids_round_trip_through_text(tiny_model_dir):
    """inference-perf samples random ids, decodes them, and counts tokens of the text client-side."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ours = Tokenizer(tiny_model_dir)
    n_special = 6
    ids = torch.randint(n_special, ours.vocab_size, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    text = hf.decode(ids)
    assert text == ours.decode(ids)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert ours.encode(text, add_special_tokens=False) == ids


def test_layer_slice_preset_has_r1_width():
    cfg = preset_config("layer-slice", num_moe_layers=2)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (256, 8, 8, 4)
    assert cfg.num_hidden_layers == 3 and cfg.first_k_dense_replace == 1 and cfg.vocab_size == 129280
    assert cfg.kv_cache_dim == 576
    total = sum(torch.Size(s).numel() for _, s, _ in tensor_specs(cfg))
    # DeepSeek-R1 (its published config): MoE layer 11.507B, dense layer 583.5M, embed 926.7M (x2 with the head)
    assert abs(total - (2 * 11.507e9 + 583.5e6 + 2 * 926.7e6)) / total < 0.002


def test_sharded_checkpoint_loads_identically(tiny_model_dir, tmp_path):
    from wideep.model.make_model import make_model

    sharded = make_model("tiny", tmp_path / "sharded", shard_size_bytes=2 << 20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    a, b = load_model(sharded), load_model(tiny_model_dir)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
