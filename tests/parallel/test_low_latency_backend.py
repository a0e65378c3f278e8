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


def test_fp8_rows_with_per_token_scales_round_trip():
    torch.manual_seed(0)
    x = torch.randn(16, 64) * torch.logspace(-3, 3, 16)[:, None]   # rows of very different magnitude
    q, scale = quantize_rows_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16,)
    back = dequantize_rows_fp8(q, scale, torch.float32)
    rel = (back - x).abs().amax(dim=1) / x.abs().amax(dim=1)
    assert float(rel.max()) < 0.07          # e4m3: 3 mantissa bits, per-row scale keeps every row's range
    zero_q, zero_s = quantize_rows_fp8(torch.zeros(2, 8))
    assert torch.equal(dequantize_rows_fp8(zero_q, zero_s, torch.float32), torch.zeros(2, 8))


def test_packed_rows_round_trip_through_a_byte_buffer():
    from wideep.parallel.symm_dispatch import row_bytes, row_fields

    torch.manual_seed(1)
    hidden, k, n = 64, 3, 5
    buf = torch.zeros((2, n, row_bytes(hidden, k)), dtype=torch.uint8)    # [ranks, tokens, bytes]
    x = torch.randn(n, hidden)
    q, scale = quantize_rows_fp8(x)
    ids = torch.randint(0, 100, (n, k), dtype=torch.int32)
    w = torch.rand(n, k)
    bx, bs, bi, bw = row_fields(buf[1], hidden, k)
    bx[:], bs[:], bi[:], bw[:] = q, scale, ids, w
    rx, rs, ri, rw = row_fields(buf[:, :n], hidden, k)
    assert torch.equal(ri[1], ids) and torch.equal(rw[1], w) and torch.equal(rs[1], scale)
    assert torch.equal(dequantize_rows_fp8(rx[1].reshape(n, hidden), rs[1].reshape(-1), torch.float32),
                       dequantize_rows_fp8(q, scale, torch.float32))
    assert not ri[0].any()    # the other rank's block is untouched
