"""Quantization settings, validated against the model before any work starts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from .errors import QuantError

GROUP_SIZES = (32, 64, 128)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantConfig:
    w_bits: int = 4
    group_size: int = 128
    method: str = "awq"  # "awq" or "rtn" (round to nearest, the baseline)
    search_scale: bool = True  # False: LMDeploy's fixed ratio 0.5
    duo_scaling: bool = True
    clip: bool = True
    calib_dataset: str = "builtin"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    batch_size: int = 8
    seed: int = 42
    dtype: str = "auto"  # checkpoint dtype of scales and unquantized tensors
    max_shard_size: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.w_bits != 4:
            raise QuantError(f"--w-bits {self.w_bits} is not supported: the AutoAWQ GEMM layout is 4-bit; use --w-bits 4")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"--w-group-size {self.group_size} is not supported; use one of {GROUP_SIZES}")
        if self.method not in ("awq", "rtn"):
            raise QuantError(f"unknown method {self.method!r}; use awq or rtn")
        if self.dtype not in ("auto", *DTYPES):
            raise QuantError(f"--dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise QuantError("--batch-size must be at least 1")
        if self.max_shard_size > 5 * 1024**3:
            raise QuantError("shards are at most 5 GB")

    out_dtype: torch.dtype = torch.float16  # resolved against the model by resolve_dtype

    def resolve_dtype(self, model_dtype: torch.dtype) -> None:
        self.out_dtype = DTYPES[self.dtype] if self.dtype != "auto" else model_dtype
        if self.out_dtype == torch.float32:
            self.out_dtype = torch.float16

    def check_model(self, config) -> None:
        """Every quantized linear's in_features must divide by the group size; suggest one that does."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dims = {
            "hidden_size": config.hidden_size,
            "num_attention_heads*head_dim": config.num_attention_heads * head_dim,
            "intermediate_size": config.intermediate_size,
        }
        bad = {k: v for k, v in dims.items() if v % self.group_size}
        if bad:
            fits = [g for g in GROUP_SIZES if all(v % g == 0 for v in dims.values())]
            hint = f"use --w-group-size {max(fits)}" if fits else "no supported group size divides this model"
            raise QuantError(f"group size {self.group_size} does not divide {bad}; {hint}")
        outs = {"kv": config.num_key_value_heads * head_dim, **dims}
        odd = {k: v for k, v in outs.items() if v % 8}
        if odd:
            raise QuantError(f"output features {odd} are not multiples of 8, which the AutoAWQ layout needs")

    def fingerprint(self, model_id: str) -> str:
        """Hash of everything that changes the result: a resumed job must match it."""
        keys = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "max_shard_size", "out_dtype")}
        keys["out_dtype"] = str(self.out_dtype)
        keys["model"] = model_id
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]

    def quantization_config(self) -> dict:
        return {
            "quant_method": "awq", "bits": self.w_bits, "group_size": self.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": [],
        }
