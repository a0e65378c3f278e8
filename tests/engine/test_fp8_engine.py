"""`wideep make-model tiny --fp8` checkpoints run natively in FP8 through the engine (vLLM semantics), the
static-shape decode path included; --quantization none dequantizes; blocks return to the pool."""
from __future__ import annotations

import pytest

from wideep import LLM, SamplingParams
from wideep.model.fp8 import Fp8Linear


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    from wideep.model.make_model import make_model

    out = tmp_path_factory.mktemp("tiny-fp8")
    make_model("tiny", out, fp8=True, seed=3)
    return out


def test_fp8_checkpoint_generates_natively(fp8_dir):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    native = LLM(str(fp8_dir), block_size=16, kv_cache_memory_bytes=4 << 20)
    assert isinstance(native.core.model.model.layers[0].self_attn.o_proj, Fp8Linear)
    a = native.generate(["the quick brown fox", "one two"], sp)
    # the static-shape decode path (CUDA-graph stand-in on CPU) gives the same tokens
    native.core.runner.use_static_decode([4])
    b = native.generate(["the quick brown fox", "one two"], sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b] and all(len(o.token_ids) == 6 for o in a)
    assert native.core.num_free_blocks == native.core.num_blocks

    deq = LLM(str(fp8_dir), block_size=16, kv_cache_memory_bytes=4 << 20, quantization="none")
    assert not isinstance(deq.core.model.model.layers[0].self_attn.o_proj, Fp8Linear)
    c = deq.generate(["the quick brown fox"], sp)
    assert len(c[0].token_ids) == 6 and deq.core.num_free_blocks == deq.core.num_blocks
