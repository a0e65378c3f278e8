"""symm_mem_ll and vLLM's deepep_low_latency name: the CPU side (fallback, errors, FP8 row format).
The GPU behaviour (same outputs as allgather_reducescatter at EP=2) is checked by
benchmarks/ep_overlap_check.py on 2 GPUs."""
from __future__ import annotations

import logging

import pytest
import torch

from wideep.parallel.backends import available_dispatchers, get_dispatcher
from wideep.parallel.symm_dispatch import dequantize_rows_fp8, quantize_rows_fp8


def test_registered_and_low_latency_falls_back_on_cpu_with_a_log_line(caplog):
    assert {"symm_mem_ll", "deepep_low_latency"} <= set(available_dispatchers())
    with caplog.at_level(logging.INFO, logger="wideep.parallel.symm_dispatch"):
        d = get_dispatcher("deepep_low_latency", 8)
    assert d.name == "allgather_reducescatter"
    assert "deepep_low_latency runs as allgather_reducescatter" in caplog.text


def test_symm_mem_ll_without_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match="needs CUDA GPUs and an NCCL EP group"):
        get_dispatcher("symm_mem_ll", 8, ep_rank=0, ep_size=2)


def test_fp8_rows_with_a_scale_per_128_channels_round_trip_and_requantize_to_the_same_codes():
    from wideep.model.fp8 import act_quant_ref

    torch.manual_seed(0)
    x = torch.randn(16, 300) * torch.logspace(-3, 3, 16)[:, None]   # rows of very different magnitude
    x[:, 200:] *= 1e-3                                               # and a quiet group in each row
    q, scale = quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16, 3)
    back = dequantize_rows_fp8(q, scale, torch.float32)
    quiet = (back - x)[:, 256:].abs().amax(dim=1) / x[:, 256:].abs().amax(dim=1)
    assert float(quiet.max()) < 0.07        # e4m3's 3 mantissa bits within every group, quiet ones included
    # what an FP8 expert does with a received row: dequantized to bf16, quantized again, the same codes
    q2, scale2 = act_quant_ref(dequantize_rows_fp8(q, scale, torch.bfloat16))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert float(((scale2 - scale) / scale).abs().max()) < 2 ** -8
    zero_q, zero_s = quantize_rows_fp8(torch.zeros(2, 8))
    assert torch.equal(dequantize_rows_fp8(zero_q, zero_s, torch.float32), torch.zeros(2, 8))


def test_packed_rows_round_trip_through_a_byte_buffer():
    from wideep.parallel.symm_dispatch import row_bytes, row_fields

    torch.manual_seed(1)
    hidden, k, n = 320, 3, 5
    assert row_bytes(hidden, k) == hidden + 4 * 3 + 8 * k
    buf = torch.zeros((2, n, row_bytes(hidden, k)), dtype=torch.uint8)    # [ranks, tokens, bytes]
    x = torch.randn(n, hidden)
    q, scale = quantize_rows_fp8(x)
    ids = torch.randint(0, 100, (n, k), dtype=torch.int32)
    w = torch.rand(n, k)
    bx, bs, bi, bw = row_fields(buf[1], hidden, k)
    bx[:], bs[:], bi[:], bw[:] = q, scale, ids, w
    rx, rs, ri, rw = row_fields(buf[:, :n], hidden, k)
    assert torch.equal(ri[1], ids) and torch.equal(rw[1], w) and torch.equal(rs[1], scale)
    assert torch.equal(dequantize_rows_fp8(rx[1].reshape(n, hidden), rs[1].reshape(n, -1), torch.float32),
                       dequantize_rows_fp8(q, scale, torch.float32))
    assert not ri[0].any()    # the other rank's block is untouched


needs_triton = pytest.mark.skipif(__import__("wideep.model.triton_compat", fromlist=["triton"]).triton is None,
                                  reason="triton not installed")


@needs_triton
@pytest.mark.parametrize("t,bound,hidden,k", [(5, 8, 64, 3), (8, 8, 96, 8), (0, 4, 32, 2), (1, 1, 16, 1),
                                             (3, 4, 384, 2), (2, 3, 320, 8)])
def test_packing_in_one_kernel_writes_the_bytes_of_the_torch_path(t, bound, hidden, k):
    from wideep.parallel.symm_dispatch import pack_rows, row_bytes

    g = torch.Generator().manual_seed(t * 100 + hidden)
    # e4m3 values with 448 in every 128-channel group, times a power of two per row: every quotient is an exact
    # e4m3 code, so the bytes do not depend on the rounding of the interpreter, which truncates (the GPU's
    # rounding is checked by benchmarks/ep_overlap_check.py)
    codes = torch.randint(0, 255, (t, hidden), dtype=torch.uint8, generator=g).bitwise_and_(0xF7)
    x = codes.view(torch.float8_e4m3fn).float()
    x[:, ::128] = 448.0
    x = (x * 2.0 ** torch.randint(-20, 20, (t, 1), generator=g)).to(torch.bfloat16)
    if t > 2:
        x[1] = 0                                   # an all-zero token
    ids = torch.randint(0, 64, (t, k), generator=g)
    w = torch.rand(t, k, generator=g)
    bufs = [torch.full((bound, row_bytes(hidden, k)), 7, dtype=torch.uint8) for _ in range(2)]
    pack_rows(x, ids, w, bufs[0], impl="torch")
    pack_rows(x, ids, w, bufs[1], impl="triton")
    assert torch.equal(bufs[0], bufs[1])


@needs_triton
@pytest.mark.parametrize("own", [False, True])
def test_dequantize_and_gather_in_one_kernel_equals_the_torch_path(own):
    from wideep.parallel.symm_dispatch import dequant_gather, row_bytes, row_fields

    g = torch.Generator().manual_seed(3)
    hidden, k, ranks, cap, bound = 176, 2, 3, 6, 4         # a receive buffer wider than the step's bound
    buf = torch.randint(0, 255, (ranks, cap, row_bytes(hidden, k)), dtype=torch.uint8, generator=g)
    q, scale, _, _ = row_fields(buf[:, :bound], hidden, k)
    # finite e4m3 codes times powers of two: exact in bf16 (the interpreter truncates where the GPU rounds)
    scale.copy_(2.0 ** torch.randint(-8, 8, (ranks, bound, 2), generator=g).float())
    q.view(torch.uint8).bitwise_and_(0x77)
    rows = torch.tensor([11, 0, 5, 5, 4, 7, 2], dtype=torch.int64)
    x_own = torch.randn(3, hidden, generator=g).to(torch.bfloat16) if own else None
    ref = dequant_gather(q, scale, rows, x_own, torch.bfloat16, impl="torch")
    got = dequant_gather(q, scale, rows, x_own, torch.bfloat16, impl="triton")
    assert got.shape == (rows.numel() + (3 if own else 0), hidden) and torch.equal(got, ref)
    first = dequantize_rows_fp8(q[2, 3:4], scale[2, 3:4], torch.bfloat16)        # rows index p * bound + t
    assert torch.equal(got[3 if own else 0], first[0])


@needs_triton
@pytest.mark.parametrize("own", [False, True])
def test_a_bf16_payload_travels_as_it_is(own):
    """A model whose experts take bf16 (not a native FP8 checkpoint) dispatches BF16 rows: packed, received and
    gathered bit for bit, by the kernels and by the torch path alike."""
    from wideep.parallel.symm_dispatch import dequant_gather, pack_rows, row_bytes, row_fields

    g = torch.Generator().manual_seed(4)
    t, bound, hidden, k = 5, 8, 64, 3
    x = torch.randn(t, hidden, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 64, (t, k), generator=g)
    w = torch.rand(t, k, generator=g)
    assert row_bytes(hidden, k, fp8=False) == 2 * hidden + 8 * k
    bufs = [torch.full((bound, row_bytes(hidden, k, fp8=False)), 7, dtype=torch.uint8) for _ in range(2)]
    pack_rows(x, ids, w, bufs[0], impl="torch", fp8=False)
    pack_rows(x, ids, w, bufs[1], impl="triton", fp8=False)
    assert torch.equal(bufs[0], bufs[1])
    bx, scale, bi, bw = row_fields(bufs[1], hidden, k, fp8=False)
    assert scale is None and torch.equal(bx[:t], x) and not bx[t:].any()
    assert torch.equal(bi[:t], ids.to(torch.int32)) and (bi[t:] == -1).all() and torch.equal(bw[:t], w)
    recv = torch.stack([bufs[1], bufs[1]])                  # what two source ranks' blocks hold
    q, none, _, _ = row_fields(recv, hidden, k, fp8=False)
    rows = torch.tensor([bound + 4, 0, 2, 2], dtype=torch.int64)    # p * bound + token
    x_own = x[:2] if own else None
    ref = dequant_gather(q, none, rows, x_own, torch.bfloat16, impl="torch")
    got = dequant_gather(q, none, rows, x_own, torch.bfloat16, impl="triton")
    want = torch.cat(([x[:2]] if own else []) + [x[[4, 0, 2, 2]]])
    assert torch.equal(ref, want) and torch.equal(got, want)


def test_the_model_tells_its_dispatcher_whether_the_experts_take_fp8(tiny_model_dir):
    """Building the model sets the dispatcher's payload: FP8 for a native FP8 model, the activations' own dtype
    otherwise (the base class's no-op keeps every other backend as it is)."""
    from wideep.model.config import ModelConfig
    from wideep.model.deepseek_v3 import DeepseekV3ForCausalLM
    from wideep.model.local_dispatch import LocalDispatcher

    said = []

    class Recording(LocalDispatcher):
        def set_fp8_payload(self, enabled: bool) -> None:
            said.append(enabled)

    cfg = ModelConfig.from_dir(tiny_model_dir)
    with torch.device("meta"):
        DeepseekV3ForCausalLM(cfg, Recording(cfg.n_routed_experts), fp8=False)
        DeepseekV3ForCausalLM(cfg, Recording(cfg.n_routed_experts), fp8=True)
    assert said == [False, True]
