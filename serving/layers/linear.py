"""Linear layers that know their tensor-parallel shard, dense or AWQ-packed.

A layer is built from shard specs: ``mode`` says how it splits over ranks (``column`` splits the output
features, ``row`` the input features, ``replicated`` neither) and ``parts`` lists the checkpoint tensors fused
into it (q/k/v, gate/up). Each parameter carries a ``weight_loader`` that cuts this rank's slice out of a full
checkpoint tensor and writes it at the part's offset, checking shapes on the way.

Layouts: dense ``weight [out, in]``; AWQ ``qweight [in, out/8]``, ``qzeros [in/g, out/8]``, ``scales [in/g, out]``
(fusing AWQ parts concatenates along the packed output dim, which needs each part's width to be a multiple of 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from ..config import CheckpointError, QuantConfig
from .activation import silu_and_mul
from .parallel import SINGLE, TPContext
from .reduce_norm import RowOutput, can_fuse

PACK = 8


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor inside a fused layer: its full width, this rank's width, where each goes."""

    shard_id: object
    full_out: int      # width of the checkpoint tensor
    local_out: int     # width this rank holds
    local_offset: int  # where it goes in this rank's fused output
    src_start: int     # where this rank's slice starts in the checkpoint tensor


# (out_dim, out_pack, in_dim, in_pack) of each parameter; in_pack "g" is the group size.
_DENSE = {"weight": (0, 1, 1, 1), "bias": (0, 1, None, 1)}
_AWQ = {"qweight": (1, PACK, 0, 1), "qzeros": (1, PACK, 0, "g"), "scales": (1, 1, 0, "g"), "bias": (0, 1, None, 1)}


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, quant: QuantConfig | None = None,
                 tp: TPContext = SINGLE, mode: str = "replicated", parts: list[Part] | None = None,
                 dtype: torch.dtype = torch.float32, prefix: str = ""):
        super().__init__()
        assert mode in ("column", "row", "replicated")
        self.tp, self.mode, self.prefix, self.quant = tp, mode, prefix, quant
        self.in_features = in_features
        self.in_local = tp.split(in_features, f"{prefix} in_features") if mode == "row" else in_features
        if parts is None:
            local = tp.split(out_features, f"{prefix} out_features") if mode == "column" else out_features
            parts = [Part(None, out_features, local, 0, tp.rank * local if mode == "column" else 0)]
        self.parts = {p.shard_id: p for p in parts}
        self.out_local = sum(p.local_out for p in parts)
        self.loaded: set = set()
        i, o = self.in_local, self.out_local
        if quant is None:
            self.layout = _DENSE
            self.weight = nn.Parameter(torch.empty(o, i, dtype=dtype), requires_grad=False)
        else:
            g = quant.group_size
            if i % g:
                raise ValueError(f"{prefix}: input features per rank ({i}) are not a multiple of group size {g}")
            if any(p.local_out % PACK for p in parts):
                raise ValueError(f"{prefix}: AWQ output widths per rank must be multiples of 8")
            self.layout = _AWQ
            self.group_size = g
            self.qweight = nn.Parameter(torch.empty(i, o // PACK, dtype=torch.int32), requires_grad=False)
            self.qzeros = nn.Parameter(torch.empty(i // g, o // PACK, dtype=torch.int32), requires_grad=False)
            self.scales = nn.Parameter(torch.empty(i // g, o, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(o, dtype=dtype), requires_grad=False) if bias else None

    # -- loading ------------------------------------------------------------------------------------
    def expected_names(self) -> set:
        return {(n, s) for n in self.layout if getattr(self, n) is not None for s in self.parts}

    def load(self, name: str, tensor: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's slice of checkpoint tensor ``name`` (a full, unsharded part) into place."""
        if name not in self.layout or getattr(self, name, None) is None:
            what = "AWQ" if self.quant is not None else "dense"
            raise CheckpointError(f"{self.prefix}: unexpected tensor {name!r} for a {what} linear "
                                  f"(is model_format right?)")
        param: torch.Tensor = getattr(self, name)
        out_dim, out_pack, in_dim, in_pack = self.layout[name]
        in_pack = self.group_size if in_pack == "g" else in_pack
        part = self.parts[shard_id]
        expect = [0] * param.dim()
        expect[out_dim] = part.full_out // out_pack
        if in_dim is not None:
            expect[in_dim] = self.in_features // in_pack
        if list(tensor.shape) != expect:
            raise CheckpointError(f"{self.prefix}.{name}{'' if shard_id is None else f' ({shard_id})'}: shape "
                                  f"{tuple(tensor.shape)} does not match the config's {tuple(expect)}")
        src = tensor.narrow(out_dim, part.src_start // out_pack, part.local_out // out_pack)
        if in_dim is not None and self.mode == "row":
            n = self.in_local // in_pack
            src = src.narrow(in_dim, self.tp.rank * n, n)
        dst = param.data.narrow(out_dim, part.local_offset // out_pack, part.local_out // out_pack)
        if name in ("qweight", "qzeros") and tensor.dtype != torch.int32:
            raise CheckpointError(f"{self.prefix}.{name}: dtype {tensor.dtype}, expected int32")
        dst.copy_(src)
        self.loaded.add((name, shard_id))

    def repack_weights(self) -> bool:
        """Replace ``qweight`` by its fragment-repacked copy (the only copy kept) where kernels/ runs that layout
        faster (an sm_90 GPU, bf16 or fp16; see ``kernels/repacked_dispatch.py``); False, nothing changed, elsewhere."""
        if self.quant is None or self.qweight.dim() != 2:
            return False
        rd = kernels.repacked_dispatch
        if not rd.supported(self.in_local, self.out_local, self.group_size, self.scales.dtype, self.qweight.device):
            return False
        self.qweight = nn.Parameter(rd.repack(self.qweight.data), requires_grad=False)
        return True

    # -- compute ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, act: str | None = None, defer: bool = False) -> torch.Tensor | RowOutput:
        """``x @ W^T + b``; ``act="silu_mul"`` (a fused gate/up layer) applies the MLP's activation to the halves,
        inside the W4A16 kernel's split-K sum where it has one. ``defer`` (a row layer whose output goes to an
        ``RMSNorm`` with a residual): a :class:`RowOutput` where one kernel can finish it with that norm (the
        split-K sum and the sum over ranks inside it), else the output as without."""
        if defer and self.mode == "row":
            pending = self._pending(x)
            if pending is not None:
                return pending
        bias = self.bias if self.mode != "row" else None
        if self.quant is None:
            y = F.linear(x, self.weight, bias)
        else:
            y = kernels.awq_linear(x, self.qweight, self.qzeros, self.scales, self.group_size, bias,
                                   act=None if self.mode == "row" else act)
        if self.mode == "row":
            y = self.tp.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        if act is not None and (self.quant is None or self.mode == "row"):
            y = silu_and_mul(y)
        return y

    def _pending(self, x: torch.Tensor) -> RowOutput | None:
        """This rank's output left for :func:`~.reduce_norm.reduce_add_rms_norm` (several ranks, symmetric memory):
        the split-K partials, or the output itself; ``None`` (nothing launched) where the fused kernel does not
        apply. One rank keeps its two launches (split-K sum, norm): they measured faster (:mod:`.reduce_norm`)."""
        peers = self.tp.fast  # None at one rank, and where symmetric memory is off
        if peers is None or self.bias is not None or not x.is_cuda:
            return None
        rows = x.numel() // x.shape[-1]
        if not can_fuse(rows, self.out_local, x.dtype, peers):
            return None
        parts = None
        if self.quant is not None:
            parts = kernels.awq_linear_partials(x, self.qweight, self.qzeros, self.scales, self.group_size)
        if parts is None:
            if self.quant is None:
                y = F.linear(x, self.weight)
            else:
                y = kernels.awq_linear(x, self.qweight, self.qzeros, self.scales, self.group_size)
            parts = y.reshape(1, rows, self.out_local)
        return RowOutput(parts, peers)

    def split_partials(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fp32 split-K partials ``[split, M, out]`` of this layer (bias not added) when its W4A16 kernel for
        these rows leaves them to a second launch, so that the consumer can sum them instead; else ``None`` and
        nothing launched. Only for layers whose output needs no all-reduce."""
        if self.quant is None or self.mode == "row":
            return None
        return kernels.awq_linear_partials(x, self.qweight, self.qzeros, self.scales, self.group_size)


def column_parts(sizes: dict, tp: TPContext, prefix: str) -> list[Part]:
    """Parts of a fused column-parallel layer (gate/up): each part split evenly over ranks."""
    parts, offset = [], 0
    for sid, full in sizes.items():
        local = tp.split(full, f"{prefix} {sid}")
        parts.append(Part(sid, full, local, offset, tp.rank * local))
        offset += local
    return parts


def qkv_parts(num_heads: int, num_kv_heads: int, head_dim: int, tp: TPContext) -> list[Part]:
    """q/k/v parts: query heads split over ranks; KV heads split too, or replicated when tp > kv heads."""
    hq = tp.split(num_heads, "num_attention_heads")
    if num_kv_heads >= tp.world_size:
        hkv = tp.split(num_kv_heads, "num_key_value_heads")
        kv_start = tp.rank * hkv
    else:
        if tp.world_size % num_kv_heads:
            raise ValueError(f"tp={tp.world_size} is not a multiple of num_key_value_heads={num_kv_heads}")
        hkv, kv_start = 1, tp.rank * num_kv_heads // tp.world_size
    d = head_dim
    return [
        Part("q", num_heads * d, hq * d, 0, tp.rank * hq * d),
        Part("k", num_kv_heads * d, hkv * d, hq * d, kv_start * d),
        Part("v", num_kv_heads * d, hkv * d, (hq + hkv) * d, kv_start * d),
    ]
