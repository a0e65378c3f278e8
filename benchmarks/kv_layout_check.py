"""GPU check for the cross-layer KV layout: the Triton RoPE+cache write and the MLA decode kernel on strided
per-layer views give the same bytes as on per-layer tensors (python benchmarks/kv_layout_check.py, needs CUDA)."""
import torch
from wideep.engine.kv_cache import allocate_kv_caches
from wideep.model.fused_ops import rope_cache_write
from wideep.model.mla_decode_triton import paged_mla_decode_triton
dev = torch.device("cuda:0")
g = torch.Generator(device=dev).manual_seed(0)
T, H, L, R, bs, nb, layers = 37, 16, 512, 64, 64, 8, 5
for cdt in (torch.bfloat16, torch.float8_e4m3fn):
    cross = allocate_kv_caches(layers, nb, bs, L + R, cdt, dev, True)
    ref = allocate_kv_caches(layers, nb, bs, L + R, cdt, dev, False)
    slots = torch.randperm(nb * bs, device=dev, generator=g)[:T]
    slots[3] = -1
    for li in range(layers):
        q = torch.randn(T, H, 192, device=dev, dtype=torch.bfloat16, generator=g)
        kv = torch.randn(T, L + R, device=dev, dtype=torch.bfloat16, generator=g)
        w = torch.randn(L, device=dev, dtype=torch.bfloat16, generator=g)
        ang = torch.randn(T, R // 2, device=dev, generator=g)
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
        q2 = q.clone()
        a = rope_cache_write(q, kv, w, 1e-6, cos, sin, cross[li], slots, 1.0, impl="triton")
        b = rope_cache_write(q2, kv, w, 1e-6, cos, sin, ref[li], slots, 1.0, impl="triton")
        assert torch.equal(a, b), "q_pe"
    for c, r in zip(cross, ref):
        assert torch.equal(c.view(torch.uint8), r.view(torch.uint8)), f"cache {cdt}"
    if cdt == torch.bfloat16:
        ql = torch.randn(4, H, L, device=dev, dtype=torch.bfloat16, generator=g)
        qp = torch.randn(4, H, R, device=dev, dtype=torch.bfloat16, generator=g)
        bt = torch.randperm(nb, device=dev, generator=g)[:6].view(2, 3).repeat(2, 1).int()
        lens = torch.tensor([150, 64, 192, 1], device=dev, dtype=torch.int32)
        x = paged_mla_decode_triton(ql, qp, cross[2], bt, lens, L, 0.1)
        y = paged_mla_decode_triton(ql, qp, ref[2], bt, lens, L, 0.1)
        assert torch.equal(x, y), "decode"
print("GPUCHECK OK: rope+cache write (bf16, fp8) and Triton decode on cross-layer views equal the per-layer Triton path")
