"""The fused Triton paged MLA decode against the torch reference (interpreter on CPU, compiled on CUDA).

Caches are NaN outside what each sequence owns (unowned blocks, slots past seq_len, padded table entries),
so any read the kernel should not make poisons the result.
"""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # not importorskip: importing triton here would fix its mode
    pytest.skip("triton is not installed", allow_module_level=True)

from wideep.model import mla_decode_triton as mdt  # noqa: E402  (sets the interpreter up on CPU-only hosts)
from wideep.model.attention import paged_mla_decode, paged_mla_decode_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not mdt.interpreter_active():
    pytest.skip("triton was imported before its interpreter could be selected", allow_module_level=True)


def make_case(page, seq_lens, heads=5, lat=64, rope=16, table_width=None, dtype=torch.float32, seed=0):
    """Random q's and a NaN-poisoned paged cache; block ids are shuffled so tables are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    need = [-(-s // page) for s in seq_lens]
    width = table_width or max(need + [1])
    num_blocks = sum(need) + 2
    cache = torch.full((num_blocks, page, lat + rope), float("nan"))
    ids = torch.randperm(num_blocks - 1, generator=g).tolist()   # last block: never owned, NaN
    nan_block = num_blocks - 1
    tables = torch.full((b, width), nan_block, dtype=torch.int32)
    for i, s in enumerate(seq_lens):
        for j in range(need[i]):
            blk = ids.pop()
            tables[i, j] = blk
            valid = min(page, s - j * page)
            cache[blk, :valid] = torch.randn(valid, lat + rope, generator=g)
    q_lat = torch.randn(b, heads, lat, generator=g)
    q_pe = torch.randn(b, heads, rope, generator=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    to = dict(device=DEVICE)
    return (q_lat.to(dtype=dtype, **to), q_pe.to(dtype=dtype, **to), cache.to(dtype=dtype, **to),
            tables.to(**to), sl.to(**to))


@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("chunk", [None, 128])
def test_matches_reference_fp32(page, chunk):
    q_lat, q_pe, cache, tables, seq_lens = make_case(page, [0, 1, 2 * page + 3, 3 * page], table_width=5)
    ref = paged_mla_decode_torch(q_lat, q_pe, cache, tables, seq_lens, 64, 0.25, chunk=chunk)
    out = mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.25, chunk=chunk)
    assert out.dtype == q_lat.dtype and out.shape == q_lat.shape
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0          # seq_len 0: zeros
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_matches_reference_bf16_and_odd_dims():
    # bf16 cache and queries; latent/rope widths that are not powers of two (masked tile padding)
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [37, 5, 0], heads=20, lat=48, rope=8,
                                                     dtype=torch.bfloat16, seed=3)
    ref32 = paged_mla_decode_torch(q_lat.float(), q_pe.float(), cache.float(), tables, seq_lens, 48, 0.3)
    ref = paged_mla_decode_torch(q_lat, q_pe, cache, tables, seq_lens, 48, 0.3)
    for chunk in (128, 1024):
        out = mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.3, chunk=chunk)
        assert out.dtype == torch.bfloat16
        err = (out.float() - ref32).abs().max()
        ref_err = (ref.float() - ref32).abs().max()
        assert err <= 2 * ref_err + 1e-2, (err, ref_err)   # as accurate as the bf16 reference


def test_batch_rows_are_independent():
    """A row's result does not depend on the other rows or on how wide the (graph) block table is."""
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [40, 0, 17], table_width=8, seed=5)
    out = mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.2, chunk=128)
    alone = mdt.mla_decode(q_lat[2:], q_pe[2:], cache, tables[2:, :2], seq_lens[2:], 0.2, chunk=128)
    assert torch.equal(out[2:], alone)   # split schedule from the row's own length: bit-identical
    assert out[1].abs().max() == 0
    # a graph-wide table (16 blocks = 256 tokens > chunk: a split launch and a merge): the one-split rows are
    # written by the split kernel itself, with the same bits as the unsplit launch; the 300-token row is merged
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [40, 0, 17, 300], table_width=19, seed=6)
    wide = mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.2, chunk=128)
    for i, w in ((0, 3), (2, 2)):
        alone = mdt.mla_decode(q_lat[i:i + 1], q_pe[i:i + 1], cache, tables[i:i + 1, :w], seq_lens[i:i + 1], 0.2,
                               chunk=128)
        assert torch.equal(wide[i:i + 1], alone)
    assert wide[1].abs().max() == 0
    ref = paged_mla_decode_torch(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2, chunk=128)
    torch.testing.assert_close(wide, ref, rtol=1e-5, atol=1e-5)


def test_hook_dispatch(monkeypatch):
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [20, 9], seed=7)
    ref = paged_mla_decode_torch(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2)
    monkeypatch.setenv(mdt.BACKEND_ENV, "torch")
    assert torch.equal(paged_mla_decode(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2), ref)
    monkeypatch.setenv(mdt.BACKEND_ENV, "triton")
    via_hook = paged_mla_decode(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2)
    assert torch.equal(via_hook, mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.2))
    torch.testing.assert_close(via_hook, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(mdt.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=mdt.BACKEND_ENV):
        mdt.use_triton(q_lat)


def test_bad_inputs_and_config_name_the_field(monkeypatch):
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [3])
    with pytest.raises(ValueError, match="kv_cache"):
        mdt.mla_decode(q_lat, q_pe, cache[..., :-1], tables, seq_lens, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens.repeat(2), 0.1)
    with pytest.raises(ValueError, match=mdt.CONFIG_ENV):
        mdt.DecodeConfig.parse("64,24,8,2")
    assert mdt.DecodeConfig.parse("64,32,8,2") == mdt.DecodeConfig(64, 32, 8, 2)


def test_split_schedule_depends_only_on_the_sequence():
    from wideep.model.attention import MAX_SPLITS, SPLIT_ALIGN, split_plan

    n, per = split_plan(torch.tensor([0, 1, 1024, 1025, 4096, 100000]), 1024)
    assert n.tolist() == [1, 1, 1, 2, 4, MAX_SPLITS]
    assert all(p % SPLIT_ALIGN == 0 for p in per.tolist())
    assert (n * per >= torch.tensor([0, 1, 1024, 1025, 4096, 100000])).all()   # the splits cover the context
    assert mdt.grid_splits(163840, 1024) == MAX_SPLITS and mdt.grid_splits(512, 1024) == 1


def test_kernel_multi_split_and_query_tokens_against_fp32_oracle():
    """Long ragged contexts over several splits, and 1-4 query tokens per sequence (causal within the
    new tokens), kernel (both variants) against the fp32 reference."""
    lens = [300, 0, 129, 517]
    for nq in (1, 3):
        q_lat, q_pe, cache, tables, seq_lens = make_case(16, lens, heads=6, table_width=40, seed=11 + nq)
        g = torch.Generator().manual_seed(nq)
        ql = torch.randn(len(lens), nq, 6, 64, generator=g).to(q_lat)
        qp = torch.randn(len(lens), nq, 6, 16, generator=g).to(q_pe)
        ref = paged_mla_decode_torch(ql, qp, cache, tables, seq_lens, 64, 0.2, chunk=128)
        for cfg in (mdt.INTERPRET_CONFIG, mdt.DecodeConfig(16, 16, 1, 1, split_v=True)):
            out = mdt.mla_decode(ql, qp, cache, tables, seq_lens, 0.2, config=cfg, chunk=128)
            assert out.shape == ql.shape and torch.isfinite(out).all()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # query token j of 3 sees seq_len - 2 + j tokens: the last one equals a one-token decode
    one = paged_mla_decode_torch(ql[:, 2], qp[:, 2], cache, tables, seq_lens, 64, 0.2, chunk=128)
    torch.testing.assert_close(ref[:, 2], one, rtol=1e-6, atol=1e-6)


def test_kernel_reads_fp8_cache():
    from wideep.model.attention import quantize_latent

    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [200, 33, 0], heads=4, table_width=16, seed=21)
    k_scale = 0.5
    c8 = quantize_latent(torch.nan_to_num(cache, nan=0.0), k_scale)
    ref = paged_mla_decode_torch(q_lat, q_pe, c8, tables, seq_lens, 64, 0.2, k_scale, chunk=128)
    assert torch.isfinite(ref).all()
    for cfg in (mdt.INTERPRET_CONFIG, mdt.DecodeConfig(16, 16, 1, 1, split_v=True)):
        out = mdt.mla_decode(q_lat, q_pe, c8, tables, seq_lens, 0.2, k_scale, config=cfg, chunk=128)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU runner; on CUDA the engine test below covers the model")
@torch.no_grad()
def test_model_decode_logits_match_reference(tiny_model_dir, paged_runner, monkeypatch):
    """The tiny model (fp32) through prefill + decodes: triton decode == torch decode logits."""
    from wideep.model.loader import load_model

    model = load_model(tiny_model_dir)
    logits = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(mdt.BACKEND_ENV, backend)
        runner = paged_runner(model, block_size=16)
        runner.step([(0, list(range(3, 22))), (1, [5, 6, 7])])
        outs = []
        for tok in (9, 10):
            outs += runner.step([(0, [tok]), (1, [tok + 1])], num_decodes=2)
        logits[backend] = torch.cat(outs)
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)


def test_engine_greedy_outputs_unchanged(tiny_model_dir, monkeypatch):
    """End to end: the engine's greedy tokens are the same with the fused decode as with the reference."""
    from wideep import LLM, SamplingParams

    prompts = [[11, 12, 13, 14, 15], list(range(100, 120))]
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    got = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(mdt.BACKEND_ENV, backend)
        llm = LLM(str(tiny_model_dir), block_size=16, kv_cache_memory_bytes=4 << 20, dtype="float32",
                  enforce_eager=True)
        got[backend] = [o.token_ids for o in llm.generate(prompts, sp)]
    assert got["triton"] == got["torch"]
    assert all(len(t) == 5 for t in got["torch"])


def test_auto_mode_falls_back_to_reference_when_kernel_cannot_run(monkeypatch):
    """A kernel that fails to compile/launch in auto mode warns and hands over to the torch reference."""
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [20, 9], seed=9)
    ref = paged_mla_decode_torch(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2)

    def broken(*args, **kwargs):
        raise RuntimeError("no MLA decode tile config compiled")

    monkeypatch.setattr(mdt, "mla_decode", broken)
    monkeypatch.setattr(mdt, "_broken", False)
    monkeypatch.setenv(mdt.BACKEND_ENV, "triton")   # forced: the failure surfaces
    with pytest.raises(RuntimeError):
        mdt.paged_mla_decode_triton(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2)
    monkeypatch.setenv(mdt.BACKEND_ENV, "auto")
    assert torch.equal(mdt.paged_mla_decode_triton(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2), ref)
    assert mdt._broken and not mdt.use_triton(q_lat)


def test_config_flags_and_hopper_preference(monkeypatch):
    from wideep.model.attention import SPLIT_TOKENS_ENV, split_tokens

    cfg = mdt.DecodeConfig.parse("64,64,8,2,sv,f16")
    assert cfg.split_v and cfg.f16 and mdt.DecodeConfig.parse(str(cfg)) == cfg
    with pytest.raises(ValueError, match=mdt.CONFIG_ENV):
        mdt.DecodeConfig.parse("64,64,8,2,fast")
    monkeypatch.delenv(mdt.CONFIG_ENV, raising=False)
    bf16 = mdt._candidates(128, False, torch.bfloat16, hopper=True)
    fp8 = mdt._candidates(128, False, torch.bfloat16, hopper=True, fp8=True)
    assert bf16[0].scorer and bf16[1].halfpage and not bf16[1].scorer   # measured order
    assert bf16[2].gluon and not (bf16[2].halfpage or bf16[2].scorer)
    assert bf16[3].tma and not any(c.e4m3 for c in bf16) and not any(c.scorer for c in fp8)
    assert fp8[0].e4m3 and fp8[0].halfpage and fp8[1].f16 and not (fp8[1].tma or fp8[1].gluon)   # measured order
    assert mdt.DecodeConfig.parse(str(bf16[0])) == bf16[0]
    with pytest.raises(ValueError, match="sv"):
        mdt.DecodeConfig.parse("64,64,8,2,tma")
    assert bf16[-len(mdt.CUDA_CONFIGS_MANY_HEADS):] == mdt.CUDA_CONFIGS_MANY_HEADS   # the present kernel backs it
    assert not any(c.split_v for c in mdt._candidates(128, False, torch.bfloat16, hopper=False))
    monkeypatch.setenv(SPLIT_TOKENS_ENV, "1000")
    with pytest.raises(ValueError, match=SPLIT_TOKENS_ENV):
        split_tokens()
    monkeypatch.setenv(SPLIT_TOKENS_ENV, "1024")
    assert split_tokens() == 1024


TMA = mdt.DecodeConfig(16, 16, 1, 1, split_v=True, tma=True)


def test_tma_kernel_against_fp32_oracle():
    """The Hopper TMA kernel (whole pages by tensor descriptors, the partial last page by masked loads) on
    fp16 (the interpreter's bf16 dot is not exact): NaN past seq_len and in unowned blocks, empty rows,
    several splits, 1 and 3 query tokens."""
    lens = [300, 0, 129, 517, 16]
    for nq in (1, 3):
        q_lat, q_pe, cache, tables, seq_lens = make_case(16, lens, heads=6, table_width=40, seed=31 + nq)
        g = torch.Generator().manual_seed(nq)
        ql = torch.randn(len(lens), nq, 6, 64, generator=g).to(q_lat).half()
        qp = torch.randn(len(lens), nq, 6, 16, generator=g).to(q_pe).half()
        c16 = cache.half()
        ref = paged_mla_decode_torch(ql.float(), qp.float(), c16.float(), tables, seq_lens, 64, 0.2, chunk=128)
        for chunk in (128, 1024):
            out = mdt.mla_decode(ql, qp, c16, tables, seq_lens, 0.2, config=TMA, chunk=chunk)
            assert out.shape == ql.shape and torch.isfinite(out).all()
            assert out[1].abs().max() == 0
            torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-3)


def test_tma_kernel_strided_cross_layer_view_and_batch_invariance():
    """A layer's cache as a view into a cross-layer pool (block stride = layers * page * width) gives the
    flat cache's bits; a sequence alone gives the bits it gets inside a batch (narrow vs wide table)."""
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [77, 200, 0, 33], heads=4, table_width=30, seed=41)
    q_lat, q_pe, cache = q_lat.half(), q_pe.half(), cache.half()
    pool = torch.full((cache.shape[0], 3) + tuple(cache.shape[1:]), float("nan"), dtype=cache.dtype)
    pool[:, 2] = cache
    flat = mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.2, config=TMA, chunk=128)
    view = mdt.mla_decode(q_lat, q_pe, pool[:, 2], tables, seq_lens, 0.2, config=TMA, chunk=128)
    assert torch.equal(flat, view)
    alone = mdt.mla_decode(q_lat[1:2], q_pe[1:2], cache, tables[1:2, :13], seq_lens[1:2], 0.2, config=TMA, chunk=128)
    assert torch.equal(alone, flat[1:2])


def test_tma_applicability_and_logged_fallback(monkeypatch, caplog):
    from wideep.model import mla_decode_hopper as mh

    cache = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
    assert mh.tma_supported(cache, 64, 512, 64, 64) is None
    assert mh.tma_supported(torch.zeros(4, 3, 64, 576, dtype=torch.bfloat16)[:, 1], 64, 512, 64, 64) is None
    assert "block_n" in mh.tma_supported(cache, 64, 512, 64, 32)
    odd_rows = torch.zeros(4, 64, 580, dtype=torch.bfloat16)[..., :576]   # row stride 1160 B: not 16-aligned
    assert "aligned" in mh.tma_supported(odd_rows, 64, 512, 64, 64)
    half, pe = mh.make_descriptors(torch.zeros(4, 3, 64, 576, dtype=torch.bfloat16)[:, 1], 512, 64)
    assert half.strides == [3 * 64 * 576, 576, 1] and half.block_shape == [1, 64, 256] and pe.block_shape == [1, 64, 64]

    # a cache the bulk copy cannot describe: the TMA config is refused, the next candidate serves, logged once
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [40, 7], heads=4, seed=43)
    padded = torch.full(cache.shape[:2] + (cache.shape[2] + 3,), float("nan")).half()
    padded[..., :80] = cache.half()
    odd = padded[..., :80]                                  # row stride 83 halves: not 16-byte aligned
    q_lat, q_pe = q_lat.half(), q_pe.half()
    with pytest.raises(RuntimeError):
        mdt.mla_decode(q_lat, q_pe, odd, tables, seq_lens, 0.2, config=TMA)
    monkeypatch.setattr(mdt, "_candidates", lambda *a, **k: (TMA, mdt.INTERPRET_CONFIG))
    monkeypatch.setattr(mdt, "_chosen", {})
    monkeypatch.setattr(mdt, "_logged", set())
    ref = mdt.mla_decode(q_lat, q_pe, odd, tables, seq_lens, 0.2, config=mdt.INTERPRET_CONFIG)
    with caplog.at_level("WARNING", logger=mdt.log.name):
        for _ in range(2):
            assert torch.equal(mdt.mla_decode(q_lat, q_pe, odd, tables, seq_lens, 0.2), ref)
    assert sum("did not run here" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("text", ["64,64,4,2,gluon", "64,64,4,2,gluon,hp", "64,64,4,2,gluon,hp,e4m3",
                                  "64,64,4,2,gluon,sc", "64,64,4,2,gluon,sc,ps"])
def test_gluon_config_rules_and_applicability(monkeypatch, caplog, text):
    """The Gluon kernels cannot run on the CPU (no interpreter for them): their config rules, the cache layouts
    they accept, the descriptor geometry, and that where they do not apply the next config serves, logged once."""
    cfg = mdt.DecodeConfig.parse(text)
    assert cfg.gluon and cfg.halfpage == ("hp" in text) and cfg.scorer == ("sc" in text)
    assert cfg.persistent == ("ps" in text)
    assert mdt.DecodeConfig.parse(str(cfg)) == cfg
    for bad in ("64,64,8,2,gluon", "64,64,4,2,sv,gluon", "64,64,4,2,gluon,ov", "64,64,4,2,hp", "64,64,4,3,gluon,hp",
                "64,64,4,2,gluon,ss", "64,64,8,2,sv,hp", "64,64,4,2,sc", "64,64,4,3,gluon,sc", "64,64,4,2,gluon,hp,sc",
                "64,64,4,2,gluon,sc,e4m3", "64,64,4,2,gluon,ps", "64,64,4,2,gluon,hp,ps", "64,64,8,2,sv,ps",
                "64,64,4,2,ps", "64,64,4,3,gluon,sc,ps", "64,64,4,2,gluon,hp,e4m3,ps"):
        with pytest.raises(ValueError, match=mdt.CONFIG_ENV):
            mdt.DecodeConfig.parse(bad)
    try:
        from wideep.model import mla_decode_gluon as mg
    except ImportError:
        mg = None
    if mg is not None:
        flat = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
        layered = torch.zeros(4, 3, 64, 576, dtype=torch.bfloat16)[:, 1]   # the cross-layer per-layer view
        assert mg.supported(flat, torch.bfloat16, 512, 64, 64, 128) is None
        assert mg.supported(layered, torch.bfloat16, 512, 64, 64, 128) is None
        assert "bf16" in mg.supported(flat.to(torch.float8_e4m3fn), torch.bfloat16, 512, 64, 64, 128)
        assert "tile" in mg.supported(torch.zeros(4, 32, 576, dtype=torch.bfloat16), torch.bfloat16, 512, 64, 32, 128)
        desc, blk_rows = mg.make_descriptor(layered)
        assert blk_rows == 3 * 64 and desc.shape == [3 * 192 + 64, 576] and desc.block_shape == [64, 64]
        from wideep.model import mla_decode_halfpage as mh
        # R1's tile plan fits an sm_90 block with two page stages; a third 72 KB stage would not
        assert mh.shared_bytes(512, 64, 64) <= mh.SM90_BLOCK_SMEM < mh.shared_bytes(512, 64, 64, stages=3)
        assert 2 * mh.HALF == 64

    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [40, 7], heads=4, seed=47)
    monkeypatch.setattr(mdt, "_candidates", lambda *a, **k: (cfg, mdt.INTERPRET_CONFIG))
    monkeypatch.setattr(mdt, "_chosen", {})
    monkeypatch.setattr(mdt, "_logged", set())
    ref = mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.2, config=mdt.INTERPRET_CONFIG)
    with caplog.at_level("WARNING", logger=mdt.log.name):
        assert torch.equal(mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.2), ref)
    assert sum("did not run here" in r.message for r in caplog.records) == 1


def test_e4m3_gluon_config_rules_plan_and_numerics(monkeypatch, caplog):
    """The e4m3-cache Gluon kernel (mla_decode_e4m3) cannot run on the CPU: its config rules, that it leads the
    fp8 candidates on Hopper (and only those), the caches it accepts, its shared-memory plan, its fp8
    descriptor, the exactness of the e4m3 -> bf16 widening its numerics rest on, and that over an fp8 cache it
    does not serve (here: no CUDA) the next config serves, logged once."""
    cfg = mdt.DecodeConfig.parse("64,64,4,2,gluon,hp,e4m3")
    assert cfg.e4m3 and cfg.halfpage and cfg.gluon and str(cfg) == "64,64,4,2,gluon,hp,e4m3"
    for bad in ("64,64,4,2,gluon,e4m3", "64,64,4,2,e4m3", "64,64,8,2,sv,e4m3", "64,64,4,2,gluon,hp,e4m3,f16",
                "64,64,4,3,gluon,hp,e4m3", "64,64,4,2,gluon,hp,pp"):
        with pytest.raises(ValueError, match=mdt.CONFIG_ENV):
            mdt.DecodeConfig.parse(bad)
    monkeypatch.delenv(mdt.CONFIG_ENV, raising=False)
    assert mdt._candidates(128, False, torch.bfloat16, hopper=True, fp8=True)[0] == cfg
    assert mdt.HOPPER_CONFIGS_FP8[0] == cfg and mdt.HOPPER_CONFIGS_FP8[1] == mdt.DecodeConfig.parse("64,64,8,2,sv,f16")
    assert not any(c.e4m3 for c in mdt._candidates(128, False, torch.bfloat16, hopper=True, fp8=False))
    assert not any(c.e4m3 for c in mdt._candidates(128, False, torch.bfloat16, hopper=False, fp8=True))
    monkeypatch.setenv(mdt.CONFIG_ENV, str(cfg))
    assert mdt._candidates(128, False, torch.bfloat16, hopper=True, fp8=True) == (cfg,)
    monkeypatch.delenv(mdt.CONFIG_ENV)

    # widening: every finite e4m3 value is a bf16 value (3 mantissa bits, exponents inside bf16's range)
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    wide = e4m3.float()
    finite = torch.isfinite(wide)
    assert int(finite.sum()) == 254 and torch.equal(e4m3.to(torch.bfloat16).float()[finite], wide[finite])

    try:
        from wideep.model import mla_decode_e4m3 as me
    except ImportError:
        me = None
    if me is not None:
        flat = torch.zeros(4, 64, 576, dtype=torch.float8_e4m3fn)
        layered = torch.zeros(4, 3, 64, 576, dtype=torch.float8_e4m3fn)[:, 1]   # the cross-layer per-layer view
        assert me.supported(flat, torch.bfloat16, 512, 64, 64, 128) is None
        assert me.supported(layered, torch.bfloat16, 512, 64, 64, 128) is None
        assert "e4m3" in me.supported(flat.to(torch.bfloat16), torch.bfloat16, 512, 64, 64, 128)
        assert "e4m3" in me.supported(flat, torch.float16, 512, 64, 64, 128)
        assert "tile" in me.supported(torch.zeros(4, 32, 576, dtype=torch.float8_e4m3fn), torch.bfloat16, 512, 64,
                                      32, 128)
        assert "shared memory" in me.supported(torch.zeros(4, 64, 1088, dtype=torch.float8_e4m3fn), torch.bfloat16,
                                               1024, 64, 64, 128)
        # R1's plan: bf16 query + bf16 page + two 36 KB fp8 stages + P tiles fit an sm_90 block; a third stage not
        assert me.shared_bytes(512, 64, 64) <= me.SM90_BLOCK_SMEM < me.shared_bytes(512, 64, 64, stages=3)
        assert me.shared_bytes(512, 64, 64, stages=3) - me.shared_bytes(512, 64, 64) == 64 * 576 + 16
        from wideep.model import mla_decode_gluon as mg
        desc, blk_rows = mg.make_descriptor(layered)
        assert blk_rows == 3 * 64 and desc.shape == [3 * 192 + 64, 576] and desc.block_shape == [64, 64]
        assert desc.layout.element_bitwidth == 8 and desc.layout.swizzle_byte_width == 64   # a 64-byte fp8 row

    # over an fp8 cache the e4m3 kernel does not apply here (CPU): the next candidate serves, logged once
    q_lat, q_pe, cache, tables, seq_lens = make_case(16, [40, 7], heads=4, seed=53)
    cache8 = (cache / 0.5).to(torch.float8_e4m3fn)
    monkeypatch.setattr(mdt, "_candidates", lambda *a, **k: (cfg, mdt.INTERPRET_CONFIG))
    monkeypatch.setattr(mdt, "_chosen", {})
    monkeypatch.setattr(mdt, "_logged", set())
    ref = mdt.mla_decode(q_lat, q_pe, cache8, tables, seq_lens, 0.2, 0.5, config=mdt.INTERPRET_CONFIG)
    with caplog.at_level("WARNING", logger=mdt.log.name):
        for _ in range(2):
            assert torch.equal(mdt.mla_decode(q_lat, q_pe, cache8, tables, seq_lens, 0.2, 0.5), ref)
    assert sum("did not run here" in r.message for r in caplog.records) == 1


def test_scorer_item_space_and_query_operands():
    """The one-scorer kernel's launch geometry (it cannot run on the CPU): one program per (head group, sequence,
    split) item, or (persistent) at most the given count; the batch and the grid's split count as its trailing
    arguments; and the query operands it
    copies 16 bytes at a time: kept when aligned, fresh aligned copies (same values) when not."""
    try:
        from wideep.model import mla_decode_scorer as ms
    except ImportError:
        pytest.skip("Triton without Gluon")
    assert ms.schedule(2, 37, 4, None) == ((2 * 37 * 4,), (37, 4))
    assert ms.schedule(2, 37, 4, 132) == ((132,), (37, 4)) and ms.schedule(2, 3, 1, 132) == ((6,), (3, 1))
    q_lat = torch.randn(3, 1, 8, 512, dtype=torch.bfloat16)
    q_pe = torch.randn(3, 1, 8, 64, dtype=torch.bfloat16)
    lat, pe = ms.aligned_queries(q_lat, q_pe)
    assert lat is q_lat and pe is q_pe
    heads = torch.randn(3, 1, 8, 192, dtype=torch.bfloat16)   # q_pe as a view into per-head rows
    odd_rows = torch.randn(3, 1, 8, 72, dtype=torch.bfloat16)[..., :64]   # row stride 72: not a multiple of 16
    for view, kept in ((heads[..., 128:], True), (heads[..., 124:188], False), (odd_rows, False)):
        _, pe = ms.aligned_queries(q_lat, view)
        assert (pe is view) == kept and torch.equal(pe, view)
        assert pe.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in pe.stride()[:3])


@pytest.mark.parametrize("chunk", [None, 128])
def test_negative_length_rows_are_left_to_another_kernel(chunk):
    """A negative length marks a row another kernel (FlashMLA) wrote: no split, no store, no merge; the other rows
    get the bits of a call without it."""
    lens = [0, 70, 2 * 64 + 3, 300, 5]
    q_lat, q_pe, cache, tables, seq_lens = make_case(64, lens, table_width=6)
    full = mdt.mla_decode(q_lat, q_pe, cache, tables, seq_lens, 0.25, chunk=chunk)
    owned = torch.tensor([False, True, False, True, False], device=DEVICE)
    sentinel = torch.full_like(full, 7.0)
    out = mdt.mla_decode(q_lat, q_pe, cache, tables, torch.where(owned, -1, seq_lens), 0.25, chunk=chunk,
                         out=sentinel.clone())
    assert torch.equal(out[owned], sentinel[owned])
    assert torch.equal(out[~owned], full[~owned])
