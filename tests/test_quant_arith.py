"""Packing, quantizer arithmetic, scale and clip search on constructed tensors."""

import torch

from kernels.awq_layout import dequantize, pack_int4, unpack_int4
from quant.auto_clip import search_clip
from quant.auto_scale import search_scale
from quant.quantizer import fake_quantize, pack_awq, quantize


def test_pack_matches_independent_statement_of_nibble_order():
    # AutoAWQ GEMM: nibble i of packed[r, j] holds column 8j + [0,2,4,6,1,3,5,7][i].
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    codes = torch.randint(0, 16, (5, 24))
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (5, 3)
    for r in range(5):
        for j in range(3):
            expected = sum(int(codes[r, 8 * j + order[i]]) << (4 * i) for i in range(8))
            assert int(packed[r, j]) & 0xFFFFFFFF == expected
    assert torch.equal(unpack_int4(packed).long(), codes)


def test_pack_rejects_bad_codes():
    import pytest

    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.full((1, 8), 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(1, 7, dtype=torch.long))


def test_quantize_dequantize_error_bound():
    for gs in (32, 64, 128):
        w = torch.randn(48, 256) * torch.rand(1, 256) * 3
        q, scale, zero = quantize(w, 4, gs)
        assert q.min() >= 0 and q.max() <= 15
        w_hat = fake_quantize(w, 4, gs)
        step = scale.repeat_interleave(gs, dim=1)
        # Inside the representable range the error is at most half a step.
        assert ((w - w_hat).abs() <= step / 2 + 1e-5).all()


def test_constant_groups_give_finite_scales():
    w = torch.zeros(8, 64)
    w[:, 32:] = 0.7
    q, scale, zero = quantize(w, 4, 32)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.allclose(fake_quantize(w, 4, 32), w, atol=1e-5)


def test_pack_awq_roundtrip_through_layout():
    w = torch.randn(64, 128)
    t = pack_awq(w, 4, 32, torch.float32)
    assert t["qweight"].shape == (128, 8) and t["qzeros"].shape == (4, 8) and t["scales"].shape == (4, 64)
    dense = dequantize(t["qweight"], t["qzeros"], t["scales"], 32)  # [in, out]
    assert torch.allclose(dense.t(), fake_quantize(w, 4, 32), atol=1e-5)


def test_scale_search_beats_ratio_zero_on_outlier_channels():
    torch.manual_seed(0)
    fc = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(4, 32, 128)
    x[..., :4] *= 50.0  # a few outlier input channels, as LLM activations have
    res = search_scale([fc], x, fc, bits=4, group_size=32, batch=2, device=torch.device("cpu"))
    assert res.ratio > 0 or res.duo
    assert res.loss < 0.8 * res.loss_rtn
    assert torch.isfinite(res.scales).all()
    # weights are restored after the search
    w0 = fc.weight.clone()
    search_scale([fc], x, fc, bits=4, group_size=32, batch=2, device=torch.device("cpu"))
    assert torch.equal(fc.weight, w0)


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    w[:, ::17] *= 8  # heavy-tailed groups, where clipping pays
    x = torch.randn(256, 128)
    best = search_clip(w, x, 4, 32, oc_batch=32)
    assert best.shape == (64, 4)

    def err(wq):
        return ((x @ wq.t()) - (x @ w.t())).pow(2).mean()

    clipped = w.reshape(64, 4, 32).clamp(-best[..., None], best[..., None]).reshape(64, 128)
    assert err(fake_quantize(clipped, 4, 32)) <= err(fake_quantize(w, 4, 32)) + 1e-6
