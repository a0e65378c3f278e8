"""Native FP8: the reference path against e4m3 error bounds, the Triton kernels (interpreter on CPU) against
the reference over the same quantized operands, and tiny FP8 checkpoints running natively."""
from __future__ import annotations

import pytest
import torch

from wideep.model import fp8_triton
from wideep.model.fp8 import (
    FP8_DTYPE,
    Fp8Linear,
    act_quant_ref,
    dequant_act,
    dequant_rows,
    fp8_grouped_mlp,
    fp8_linear,
    quantize_block_fp8,
    scale_row_index,
)
from wideep.model.loader import load_model

E4M3_REL = 2.0 ** -4   # round-to-nearest relative error of a normal e4m3 value (3 mantissa bits)

needs_triton = pytest.mark.skipif(not fp8_triton.available(), reason="triton not installed")
# tile shapes, split-K, swap-AB (weights on the MMA's M side), with/without the fused activation quantization
CONFIGS = [fp8_triton.GemmConfig(*c) for c in
           [(16, 64, 4, 1), (32, 32, 4, 1, 3, False, False, True), (16, 64, 4, 1, 1, True),
            (32, 64, 4, 1, 2, True, False, True)]]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("m,k,n", [(1, 200, 130), (5, 256, 64), (17, 1100, 300)])
def test_fp8_linear_within_e4m3_bound(m, k, n):
    g = _gen(m)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    w, ws = quantize_block_fp8(torch.randn(n, k, generator=g) * 0.05)
    sidx = scale_row_index([n], 128)
    w_deq = dequant_rows(w, ws, sidx)
    y = fp8_linear(x, w, ws, sidx)
    exact = x @ w_deq.t()
    # activation rounding only (the weights are exactly their dequantized values): per element <= 2^-4 |x|
    # plus the subnormal step of each group's scale
    _, s = act_quant_ref(x)
    bound = E4M3_REL * (x.abs() @ w_deq.abs().t()) + (s.max(1).values[:, None] * 2**-9) * w_deq.abs().sum(1)[None]
    assert ((y - exact).abs() <= bound + 1e-5).all()
    assert not torch.equal(y, exact)  # the activations really were quantized


def test_act_quant_ref_groups():
    x = torch.randn(3, 300, generator=_gen(1))
    x[1] = 0  # an all-zero token keeps a finite scale
    q, s = act_quant_ref(x)
    assert q.dtype == FP8_DTYPE and s.shape == (3, 3)
    assert torch.isfinite(s).all() and torch.equal(q[1].float(), torch.zeros(300))
    torch.testing.assert_close(s[0, 0], x[0, :128].abs().max() / 448)
    torch.testing.assert_close(s[2, 2], x[2, 256:].abs().max() / 448)
    assert (dequant_act(q, s) - x).abs().max() <= E4M3_REL * x.abs().max()


@needs_triton
@pytest.mark.parametrize("m,k,n", [(1, 200, 130), (7, 1100, 64), (33, 1024, 256)])
def test_triton_gemm_matches_reference(m, k, n):
    g = _gen(k)
    q, s = act_quant_ref(torch.randn(m, k, generator=g))
    w, ws = quantize_block_fp8(torch.randn(n, k, generator=g))
    sidx = scale_row_index([n], 128)
    ref = dequant_act(q, s) @ dequant_rows(w, ws, sidx).t()
    for cfg in CONFIGS:
        y = fp8_triton.fp8_gemm(q, s.t().contiguous().t(), w, ws, sidx, torch.float32, cfg)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=str(cfg))


@needs_triton
def test_triton_quant_scales_match_reference():
    # (the interpreter's own e4m3 rounding differs from the GPU's; the GPU run of benchmarks/rank.py checks
    # the codes bit-exactly) the per-group scales are plain fp32 arithmetic and must agree
    x = torch.randn(6, 300, generator=_gen(2))
    _, s = fp8_triton.act_quant(x)
    _, sr = act_quant_ref(x)
    torch.testing.assert_close(s, sr)
    h = torch.randn(5, 2 * 200, generator=_gen(3))
    _, s2 = fp8_triton.silu_mul_quant(h)
    _, s2r = act_quant_ref(torch.nn.functional.silu(h[:, :200]) * h[:, 200:])
    torch.testing.assert_close(s2, s2r)


def _experts(e, inter, hidden, seed):
    g = _gen(seed)
    w13, s13, w2, s2 = [], [], [], []
    for _ in range(e):
        a, sa = quantize_block_fp8(torch.randn(inter, hidden, generator=g) * 0.1)
        b, sb = quantize_block_fp8(torch.randn(inter, hidden, generator=g) * 0.1)
        c, sc = quantize_block_fp8(torch.randn(hidden, inter, generator=g) * 0.1)
        w13.append(torch.cat([a, b]))
        s13.append(torch.cat([sa, sb]))
        w2.append(c)
        s2.append(sc)
    return (torch.stack(w13), torch.stack(s13), scale_row_index([inter, inter], 128),
            torch.stack(w2), torch.stack(s2), scale_row_index([hidden], 128))


@needs_triton
@pytest.mark.parametrize("counts,pad", [([3, 0, 5, 1], 2), ([1], 0), ([0, 0, 40], 3)])
def test_triton_grouped_gemm_matches_reference(counts, pad):
    """Odd sizes, zero-row experts, padding rows past the counted ones, a single token."""
    inter, hidden = 72, 200  # gate/up blocks of 72 rows each: the stacked scale rows keep them apart
    w13, s13, i13, w2, s2, i2 = _experts(len(counts), inter, hidden, sum(counts))
    n = sum(counts) + pad
    q, s = act_quant_ref(torch.randn(n, hidden, generator=_gen(n)))
    tpe = torch.tensor(counts)
    xd = dequant_act(q, s)
    for cfg in CONFIGS:
        h = torch.full((n, w13.shape[1]), 7.0)
        fp8_triton.fp8_gemm(q, s.t().contiguous().t(), w13, s13, i13, torch.float32, cfg, counts=tpe, out=h)
        start = 0
        for e, c in enumerate(counts):
            if c:
                ref = xd[start:start + c] @ dequant_rows(w13[e], s13[e], i13).t()
                torch.testing.assert_close(h[start:start + c], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                           msg=str(cfg))
            start += c
        assert (h[start:] == 7.0).all()   # padding rows are never written (split-K included)


@needs_triton
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_triton_gemm_fused_quant_and_batch_invariance(cfg):
    """The GEMM that quantizes bf16 activations itself equals act_quant + GEMM; and a row's result is
    bit-identical whatever rows share its batch (plain) or its expert group (grouped), for a fixed config."""
    g = _gen(11)
    k, n = 300, 136
    x = torch.randn(40, k, generator=g)
    w, ws = quantize_block_fp8(torch.randn(n, k, generator=g))
    sidx = scale_row_index([n], 128)
    fused = cfg._replace(fuse_quant=True)
    q, s = fp8_triton.act_quant(x)
    full = fp8_triton.fp8_gemm(q, s, w, ws, sidx, torch.float32, cfg)
    assert torch.equal(fp8_triton.fp8_gemm(x, None, w, ws, sidx, torch.float32, fused), full)
    for m in (1, 3, 17):
        q, s = fp8_triton.act_quant(x[:m])
        assert torch.equal(fp8_triton.fp8_gemm(q, s, w, ws, sidx, torch.float32, cfg), full[:m])
    # grouped: expert 1's rows alone vs beside 33 rows of expert 0 and 5 padding rows
    w3, ws3 = torch.stack([w, w.flip(0)]), torch.stack([ws, ws.flip(0)])
    both = torch.tensor([33, 7])
    xg = torch.cat([x, torch.randn(5, k, generator=g)])
    yg = fp8_triton.fp8_gemm(xg, None, w3, ws3, sidx, torch.float32, fused, counts=both)
    q, s = fp8_triton.act_quant(x[33:40])
    y1 = fp8_triton.fp8_gemm(q, s, w3, ws3, sidx, torch.float32, cfg, counts=torch.tensor([0, 7]))
    assert torch.equal(yg[33:40], y1)


# the TMA kernel (copy-engine operands, tile loop): swapped and not, split-K, one program per tile and persistent
TMA_CONFIGS = [fp8_triton.GemmConfig(16, 64, 4, 1, swap=True, tma=True),
               fp8_triton.GemmConfig(16, 64, 4, 1, split=3, swap=True, prefetch=True, tma=True, persist=1),
               fp8_triton.GemmConfig(32, 32, 4, 1, split=2, tma=True, persist=2, maxnreg=168)]


@needs_triton
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=str)
def test_tma_gemm_matches_reference_and_is_batch_invariant(cfg):
    """K a multiple of 16 (the copy engine's row alignment): the TMA kernel equals the dequantized product,
    bit-identically to itself whatever the row count."""
    g = _gen(21)
    m, k, n = 37, 512, 200
    q, s = act_quant_ref(torch.randn(m, k, generator=g))
    w, ws = quantize_block_fp8(torch.randn(n, k, generator=g))
    sidx = scale_row_index([n], 128)
    assert fp8_triton._tma_ok(q, w)
    ref = dequant_act(q, s) @ dequant_rows(w, ws, sidx).t()
    full = fp8_triton.fp8_gemm(q, s.t().contiguous().t(), w, ws, sidx, torch.float32, cfg)
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    for rows in (1, 5, 16):
        y = fp8_triton.fp8_gemm(q[:rows], s[:rows].t().contiguous().t(), w, ws, sidx, torch.float32, cfg)
        assert torch.equal(y, full[:rows])


@needs_triton
@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=str)
@pytest.mark.parametrize("counts,pad", [([3, 0, 20, 1], 2), ([0, 0, 17], 3)])
def test_tma_grouped_gemm_zero_rows_padding_and_invariance(cfg, counts, pad):
    """Grouped over expert-contiguous rows: zero-row experts, padding rows never written, each expert's rows
    bit-identical to that expert alone. inter 64 + 64 (gate ‖ up, in separate scale blocks), hidden 256."""
    inter, hidden = 64, 256
    w13, s13, i13, _, _, _ = _experts(len(counts), inter, hidden, 7)
    n = sum(counts) + pad
    q, s = act_quant_ref(torch.randn(n, hidden, generator=_gen(n)))
    s = s.t().contiguous().t()
    h = torch.full((n, 2 * inter), 7.0)
    fp8_triton.fp8_gemm(q, s, w13, s13, i13, torch.float32, cfg, counts=torch.tensor(counts), out=h)
    xd = dequant_act(q, s)
    start = 0
    for e, c in enumerate(counts):
        if c:
            ref = xd[start:start + c] @ dequant_rows(w13[e], s13[e], i13).t()
            torch.testing.assert_close(h[start:start + c], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
            alone = [0] * len(counts)
            alone[e] = c
            qa, sa = q[start:start + c], s[start:start + c].t().contiguous().t()
            y = fp8_triton.fp8_gemm(qa, sa, w13, s13, i13, torch.float32, cfg, counts=torch.tensor(alone))
            assert torch.equal(y, h[start:start + c])
        start += c
    assert (h[start:] == 7.0).all()


def test_uniform_scale_width():
    """The column windows over which a stacked weight's scale row is constant: R1's q_a ‖ kv_a (1536 + 576)
    keeps whole 128-blocks, tiny parts narrow it, an index the GEMM did not see made is unknown (0)."""
    from wideep.model.fp8 import uniform_scale_cols, uniform_width

    assert uniform_width([1536, 576], 128) == 128
    assert uniform_width([7168], 128) == 128
    assert uniform_width([64, 64], 128) == 64
    assert uniform_width([100, 200], 128) == 4
    for rows in ([100, 200], [64, 64, 64], [1536, 576]):
        sidx = scale_row_index(rows, 128)
        w = uniform_scale_cols(sidx)
        assert w == uniform_width(rows, 128)
        assert all((sidx[j:j + w] == sidx[j]).all() for j in range(0, sidx.numel(), w))
    assert uniform_scale_cols(scale_row_index([256], 128).clone()) == 0


@needs_triton
@pytest.mark.parametrize("swap", [False, True])
def test_tma_scalar_weight_scales_bit_identical_to_vector(swap, monkeypatch):
    """One weight scale per tile and K block (SCALAR_BS) gives the same bits as the per-column vector, plain
    and grouped (gate ‖ up parts of 64 rows: 64-wide windows, so 64-wide tiles take the scalar path)."""
    cfg = fp8_triton.GemmConfig(16, 64, 4, 1, split=2, swap=swap, prefetch=True, tma=True, persist=1)
    g = _gen(8)
    q, s = act_quant_ref(torch.randn(21, 256, generator=g))
    s = s.t().contiguous().t()
    w13, s13, i13, _, _, _ = _experts(3, 64, 256, 9)
    w, ws = quantize_block_fp8(torch.randn(200, 256, generator=g))
    sidx = scale_row_index([200], 128)
    counts = torch.tensor([5, 0, 16])
    outs = []
    for scalar in (True, False):
        monkeypatch.setattr(fp8_triton, "SCALAR_WEIGHT_SCALES", scalar)
        outs.append((fp8_triton.fp8_gemm(q, s, w, ws, sidx, torch.float32, cfg),
                     fp8_triton.fp8_gemm(q, s, w13, s13, i13, torch.float32, cfg, counts=counts)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_triton
def test_tma_config_falls_back_where_the_copy_engine_cannot_read():
    """K = 200 rows are not 16-byte aligned: a tma config runs the pointer kernel with the same tiles."""
    g = _gen(5)
    q, s = act_quant_ref(torch.randn(9, 200, generator=g))
    w, ws = quantize_block_fp8(torch.randn(70, 200, generator=g))
    sidx = scale_row_index([70], 128)
    assert not fp8_triton._tma_ok(q, w)
    cfg = TMA_CONFIGS[1]
    y = fp8_triton.fp8_gemm(q, s.t().contiguous().t(), w, ws, sidx, torch.float32, cfg)
    ptr = fp8_triton.fp8_gemm(q, s.t().contiguous().t(), w, ws, sidx, torch.float32,
                              cfg._replace(tma=False, persist=0))
    assert torch.equal(y, ptr)


def test_decode_configs_are_valid():
    for key, cfg in fp8_triton.DECODE_CONFIGS.items():
        cfg.check()
        assert fp8_triton.GemmConfig.parse(str(cfg)) == cfg, key
    assert fp8_triton.pick_config(4096, 7168, 8).tma   # R1's EP=32 expert GEMMs run on the TMA kernel


def test_gemm_config_parse():
    assert fp8_triton.GemmConfig.parse("64,128,4,3") == fp8_triton.GemmConfig(64, 128, 4, 3)
    assert fp8_triton.GemmConfig.parse("32,64,4,4,2,1,0") == fp8_triton.GemmConfig(32, 64, 4, 4, 2, True, False)
    assert fp8_triton.GemmConfig.parse("32,64,4,4,2,1,0,1").prefetch
    cfg = fp8_triton.GemmConfig.parse("64,128,4,3,1,0,0,0,1,3,168")
    assert cfg.tma and cfg.persist == 3 and cfg.maxnreg == 168
    for bad in ("64,128,4", "48,128,4,3", "64,128,4,3,0",
                "64,128,4,3,1,0,0,0,0,2",       # persistent without the TMA kernel
                "64,128,4,3,1,0,1,0,1",         # the TMA kernel reads quantized activations only
                "64,128,4,3,1,0,0,0,1,0,-1", "64,128,4,3,1,0,0,0,1,0,0,0"):
        with pytest.raises(ValueError):
            fp8_triton.GemmConfig.parse(bad)


def test_grouped_mlp_reference_zero_rows_and_padding():
    counts = [2, 0, 3]
    w13, s13, i13, w2, s2, i2 = _experts(3, 72, 200, 5)
    x = torch.randn(7, 200, generator=_gen(9))  # 5 counted rows + 2 padding rows
    y = fp8_grouped_mlp(x, w13, s13, i13, w2, s2, i2, torch.tensor(counts), impl="torch")
    assert torch.equal(y[5:], torch.zeros(2, 200))
    # each row equals its expert's FP8 MLP alone (no cross-row effects: batch invariant)
    for row, e in [(0, 0), (1, 0), (2, 2), (4, 2)]:
        h = fp8_linear(x[row:row + 1], w13[e], s13[e], i13)
        a = torch.nn.functional.silu(h[:, :72]) * h[:, 72:]
        torch.testing.assert_close(y[row:row + 1], fp8_linear(a, w2[e], s2[e], i2))


@pytest.mark.parametrize("variant", ["fp8", "fp8_dense", "fp8_no_q_lora"])
def test_fp8_checkpoint_runs_natively(variant, variant_dir, paged_runner):
    """An FP8 checkpoint loads as e4m3 + scales (half the projection bytes) and its logits stay within the
    e4m3 activation-rounding error of the dequantized model; quantization='none' is that dequantized model."""
    d = variant_dir(variant)
    native, deq = load_model(d), load_model(d, quantization="none")
    attn = native.model.layers[0].self_attn
    assert isinstance(attn.kv_b_proj, Fp8Linear) and attn.kv_b_proj.weight.dtype == FP8_DTYPE
    moe = native.moe_layers()
    if moe:
        assert moe[0].experts.w13.dtype == FP8_DTYPE
        torch.testing.assert_close(dequant_rows(moe[0].experts.w2[1], moe[0].experts.w2_scale_inv[1],
                                                scale_row_index([moe[0].experts.hidden], 128)),
                                   deq.moe_layers()[0].experts.w2[1])
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert nbytes(native) < 0.75 * nbytes(deq)
    ids = torch.randint(6, 4096, (9,), generator=_gen(4)).tolist()
    (a,) = paged_runner(native).step([(0, ids)])
    (b,) = paged_runner(deq).step([(0, ids)])
    assert not torch.equal(a, b)
    rel = ((a - b).norm() / b.norm()).item()
    # a handful of projections in series, each within ~2^-4 relative per element (a few % in norm);
    # MoE routing may flip on near ties, which the looser bound of the MoE variants allows
    assert rel < (0.15 if variant == "fp8_dense" else 0.6), rel
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() > (0.98 if variant == "fp8_dense" else 0.8)


def test_quantization_fp8_needs_fp8_checkpoint(variant_dir):
    with pytest.raises(ValueError, match="needs an FP8 checkpoint"):
        load_model(variant_dir("bf16"), quantization="fp8")
    with pytest.raises(ValueError, match="quantization must be"):
        load_model(variant_dir("fp8"), quantization="int4")


@needs_triton
@pytest.mark.parametrize("m,n,counts", [(7, 200, [3, 0, 2]), (40, 1030, [17, 23]), (5, 9, [0, 0]), (1, 3, [1])])
def test_zero_tail_zeroes_only_rows_past_the_counts(m, n, counts):
    y = torch.full((m, n), float("nan"))
    fp8_triton.zero_tail(y, torch.tensor(counts))
    c = sum(counts)
    assert torch.equal(y[c:], torch.zeros(m - c, n)) and bool(y[:c].isnan().all())


@needs_triton
def test_fp8_grouped_mlp_triton_matches_torch_path(monkeypatch):
    """The whole Triton expert MLP (quantize, w13, SiLU-and-quantize, w2) against the torch path: zero-row
    expert, padding rows zero, every counted row written (the output starts as NaN here); impl 'cublas' is
    refused off CUDA."""
    counts = [3, 0, 2]
    w13, s13, i13, w2, s2, i2 = _experts(3, 72, 200, 6)
    x = torch.randn(7, 200, generator=_gen(10))
    real = fp8_triton.zero_tail
    monkeypatch.setattr(fp8_triton, "zero_tail", lambda y, c: real(y.fill_(float("nan")), c))
    y = fp8_grouped_mlp(x, w13, s13, i13, w2, s2, i2, torch.tensor(counts), impl="triton")
    assert not bool(y.isnan().any())
    ref = fp8_grouped_mlp(x, w13, s13, i13, w2, s2, i2, torch.tensor(counts), impl="torch")
    assert torch.equal(y[5:], torch.zeros(2, 200))
    # the interpreter rounds e4m3 its own way: codes may differ by one step from the torch reference
    torch.testing.assert_close(y, ref, rtol=0.15, atol=0.15 * ref.abs().max().item())
    with pytest.raises(ValueError):
        fp8_grouped_mlp(x, w13, s13, i13, w2, s2, i2, torch.tensor(counts), impl="cublas")


def test_cublas_refusal_is_remembered_per_weight_shape(monkeypatch):
    """A block-scaled cuBLAS refusal sends that weight shape to Triton from then on, not every shape."""
    from wideep.model import fp8 as fp8mod

    monkeypatch.setattr(fp8mod, "CUBLAS_REFUSED", {})

    def refuse(*args, **kwargs):
        raise RuntimeError("refused")
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    a, sa = quantize_block_fp8(torch.randn(256, 128))
    b, sb = quantize_block_fp8(torch.randn(128, 256))
    q, s = act_quant_ref(torch.randn(4, 128))
    assert fp8mod._cublas_block_fp8_ok(a, sa) and fp8mod._cublas_block_fp8_ok(b, sb)
    assert fp8mod._cublas_block_fp8(q, s, a, sa, torch.float32, 4) is None
    assert not fp8mod._cublas_block_fp8_ok(a, sa) and fp8mod._cublas_block_fp8_ok(b, sb)
    assert "refused" in fp8mod.CUBLAS_REFUSED[(None, 256, 128)]
