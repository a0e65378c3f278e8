"""FlashMLA's schedule, made by wideep for batch invariance (mla_decode_flashmla), checked against the semantics
of FlashMLA's SM90 kernel loop on the CPU; the kernel itself runs on an H200 (benchmarks/mla_decode.py)."""
import importlib.util

import pytest
import torch

from wideep.model import mla_decode_flashmla as fm


def walk(plan: fm.Plan, b: int) -> list[tuple[int, int, int, bool, int]]:
    """What FlashMLA's kernel does with the metadata, per part: (sequence, first page, end page, written
    directly, split index), in the order of its loop over a part's sequences."""
    done = []
    for row in plan.meta.tolist():
        first, last, first_page, end_page, split0, first_split, last_split, _ = row
        if first >= b:
            continue
        for i in range(first, last + 1):
            pages = -(-int(plan.lens[i]) // fm.PAGE)
            start = first_page if i == first else 0
            end = end_page if i == last else pages
            direct = not first_split if i == first else (not last_split if i == last else True)
            done.append((i, start, end, direct, int(plan.splits[i]) + (split0 if i == first else 0)))
    return done


@pytest.mark.parametrize("lens,rows,sms", [
    ([2048] * 128, 128, 132),
    ([2048] * 256, 128, 132),
    ([0, 1, 64, 65, 2047, 2048, 2049, 5000, 0, 100], 128, 132),
    ([3000] * 7 + [10] * 3, 16, 132),
    ([5], 128, 132),
    ([0] * 40, 64, 114),
    ([4096] * 64, 128, 132),
    ([4096, 10, 4096, 4096, 20, 4096], 128, 132),
])
def test_plan_takes_each_short_sequence_whole_and_leaves_the_rest(lens, rows, sms):
    chunk = 2048
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    plan = fm.make_plan(seq_lens, rows, chunk, sms)
    b = len(lens)
    parts = max(sms // -(-rows // 64), 1)
    assert plan.meta.shape == (parts, fm.META_INTS) and plan.meta.dtype == torch.int32
    assert plan.meta.is_contiguous() and plan.splits.tolist() == list(range(b + 1))
    short = [n <= chunk for n in lens]
    assert plan.lens.tolist() == [n if s else 0 for n, s in zip(lens, short)]
    assert plan.rest.tolist() == [-1 if s else n for n, s in zip(lens, short)]
    done = walk(plan, b)
    taken = sorted(i for i, *_ in done)
    assert len(set(taken)) == len(taken)                      # at most once, in one part
    assert {i for i, s in enumerate(short) if s} <= set(taken)
    assert all(short[i] for i in (taken[0], taken[-1])) if taken else not any(short)
    for i, start, end, direct, split in done:
        assert (start, end, direct, split) == (0, -(-int(plan.lens[i]) // fm.PAGE), True, i)
    # parts take contiguous runs in order, each about the mean cost (+ at most one sequence)
    cost = [-(-int(n) // fm.PAGE) + fm.OVERHEAD_PAGES if s else 0 for n, s in zip(plan.lens.tolist(), short)]
    loads = {}
    for row in plan.meta.tolist():
        if row[0] < b:
            assert short[row[0]] and short[row[1]]            # a part starts and ends with its own sequences
            loads[(row[0], row[1])] = sum(cost[row[0]:row[1] + 1])
    runs = sorted(loads)
    assert all(a[1] < c[0] and not any(short[a[1] + 1:c[0]]) for a, c in zip(runs, runs[1:]))
    if loads:
        assert max(loads.values()) <= sum(cost) / parts + max(cost)


def test_plan_depends_on_each_sequence_alone_for_what_it_computes():
    """Alone or in a batch of 37 (graph padding is such a batch: zero-length rows), a sequence is taken by the
    same kernel over the same pages, written directly."""
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(0, 5000, (37,), generator=g, dtype=torch.int32)
    batch = fm.make_plan(lens, 128, 2048, 132)
    walked = {i: (s, e, d) for i, s, e, d, _ in walk(batch, 37)}
    short = [i for i in range(37) if lens[i] <= 2048]
    assert 3 < len(short) < 34
    for i in range(37):
        alone = fm.make_plan(lens[i:i + 1], 128, 2048, 132)
        assert alone.rest.item() == batch.rest[i].item()       # wideep's kernel: the same length, or -1
        if i in short:
            (_, s, e, d, _), = walk(alone, 1)
            assert (s, e, d) == walked[i]
        else:   # wideep's kernel writes the row; FlashMLA leaves it alone (or passes it with no pages)
            assert walk(alone, 1) == [] and walked.get(i, (0, 0, True))[:2] == (0, 0)


def test_fused_query_is_a_view_else_a_copy():
    buf = torch.randn(6, 3, 576).transpose(0, 1)          # [B, H, 576] head-major, as MLA._decode writes it
    q_lat, q_pe = buf[..., :512][:, None], buf[..., 512:][:, None]
    q = fm._query(q_lat, q_pe)
    assert q.data_ptr() == q_lat.data_ptr() and torch.equal(q, torch.cat([q_lat, q_pe], -1))
    apart = fm._query(q_lat.clone(), q_pe.clone())
    assert apart.data_ptr() != q_lat.data_ptr() and torch.equal(apart, q)


def test_applies_only_where_the_kernel_exists(monkeypatch):
    q = torch.zeros(2, 1, 128, 512, dtype=torch.bfloat16)
    cache = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
    assert not fm.applies(q, cache, True)                   # CPU
    assert not fm.applies(q, cache, False)
    monkeypatch.setenv("WIDEEP_MLA_DECODE", "triton")
    assert not fm.applies(q, cache, True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("lens,rows,sms", [
    ([2048] * 128, 128, 132),
    ([0, 1, 64, 65, 2047, 2048, 2049, 5000, 0, 100], 128, 132),
    ([3000] * 7 + [10] * 3, 16, 132),
    ([4096] * 9, 128, 132),
    ([5], 128, 132),
    (list(range(0, 6000, 37)), 64, 114),
])
def test_plan_kernel_gives_the_reference_integers(lens, rows, sms):
    from wideep.model import mla_decode_triton as mdt
    if not mdt.interpreter_active():
        pytest.skip("triton was imported before its interpreter could be selected")
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = fm.make_plan(seq_lens, rows, 2048, sms)
    got = fm.make_plan_on_device(seq_lens, rows, 2048, sms)
    for name in ("meta", "splits", "lens", "rest"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def _stand_in_for_flashmla(monkeypatch, decode):
    """FlashMLA as if it applied here (an H200 with the wheel): wideep's plan on 132 SMs, `decode` as its kernel."""
    monkeypatch.setattr(fm, "applies", lambda q_lat, kv_cache, hopper: True)
    monkeypatch.setattr(fm, "plan_for", lambda seq_lens, rows, chunk, memo, index: fm.make_plan(seq_lens, rows, chunk,
                                                                                                132))
    monkeypatch.setattr(fm, "decode", decode)
    monkeypatch.setattr(fm, "_failed", [])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_a_library_that_fails_to_run_hands_every_sequence_back(monkeypatch, caplog):
    """FlashMLA imports but its launch fails (another driver, another sm_90 part): wideep's kernels take every
    sequence, with one warning, instead of the torch reference taking the whole decode."""
    from wideep.model import mla_decode_triton as mdt
    from wideep.model.attention import paged_mla_decode_torch
    if not mdt.interpreter_active():
        pytest.skip("triton was imported before its interpreter could be selected")

    def boom(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")
    _stand_in_for_flashmla(monkeypatch, boom)
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 40, 0], dtype=torch.int32)
    cache = torch.randn(8, 16, 24, generator=g)
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 7]], dtype=torch.int32)
    q_lat, q_pe = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 8, generator=g)
    with caplog.at_level("WARNING"):
        out = mdt.mla_decode(q_lat, q_pe, cache, tables, lens, 0.3)
    ref = paged_mla_decode_torch(q_lat, q_pe, cache, tables, lens, 16, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert fm._failed and "FlashMLA decode failed" in caplog.text and not mdt._broken


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("width,launches", [(8, 0), (40, 1)])
def test_a_one_split_table_leaves_wideep_nothing_to_launch(monkeypatch, width, launches):
    """With FlashMLA taking every sequence of at most one split, a block table no wider than one split (the engine's
    narrow decode graphs) can hold no other: wideep's kernels are not launched at all; a wider one keeps their
    launch (in a graph it must serve any length). Both give the reference's values."""
    from wideep.model import mla_decode_triton as mdt
    from wideep.model.attention import paged_mla_decode_torch
    if not mdt.interpreter_active():
        pytest.skip("triton was imported before its interpreter could be selected")
    g = torch.Generator().manual_seed(1)
    page, chunk, lat = 16, 128, 16
    lens = torch.tensor([5, 128, 0, 77] + ([600] if width > 8 else []), dtype=torch.int32)
    b = lens.shape[0]
    cache = torch.randn(b * width + 1, page, lat + 8, generator=g)
    tables = torch.arange(b * width, dtype=torch.int32).reshape(b, width)
    q_lat, q_pe = torch.randn(b, 2, lat, generator=g), torch.randn(b, 2, 8, generator=g)

    def flashmla(q_lat, q_pe, kv_cache, block_tables, plan, scale):   # the rows the plan gives it, by the reference
        return paged_mla_decode_torch(q_lat[:, 0], q_pe[:, 0], kv_cache, block_tables, plan.lens, lat, scale)[:, None]
    calls = []
    launch = mdt._launch
    monkeypatch.setattr(mdt, "_launch", lambda *a: (calls.append(1), launch(*a)))
    _stand_in_for_flashmla(monkeypatch, flashmla)
    out = mdt.mla_decode(q_lat, q_pe, cache, tables, lens, 0.3, chunk=chunk)
    assert len(calls) == launches
    ref = paged_mla_decode_torch(q_lat, q_pe, cache, tables, lens, lat, 0.3, chunk=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
