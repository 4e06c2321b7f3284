"""Read a Hugging Face model lazily: config, tokenizer, and one decoder block at a time from safetensors.

The whole model never sits in memory: a block's tensors are read with ``safe_open`` only when that block is
processed, into a ``decoder.DecoderBlock`` (plain torch: a block worker never imports transformers' models).
"""

from __future__ import annotations

import copy
import json
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from .decoder import BlockSpec, DecoderBlock
from .errors import QuantError
from .families import Family, family_for


def resolve_model_dir(model: str) -> Path:
    """A local directory, or a hub id downloaded (safetensors, config and tokenizer only) to the HF cache."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/")):
        raise QuantError(f"model path {model!r} is not a directory with a config.json")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:
        raise QuantError(
            f"{model!r} is not a local directory and could not be fetched from the hub ({type(exc).__name__}); "
            f"pass the path of a downloaded model directory"
        ) from exc


class ModelSource:
    """A model directory opened for reading tensors by name, one file handle per shard.

    Opening one needs no transformers import (a block worker opens one): the family comes from config.json's
    ``architectures``/``model_type``; ``config``, transformers' config object with its class defaults filled
    in, is loaded on first use (the driver's steps).
    """

    def __init__(self, model: str | Path):
        self.path = resolve_model_dir(str(model))
        if not (self.path / "config.json").is_file():
            raise QuantError(f"{self.path} has no config.json; pass a Hugging Face model directory")
        try:
            self.config_dict: dict = json.loads((self.path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise QuantError(f"{self.path}/config.json is not valid JSON ({exc}); re-download or re-save the model") from None
        d = self.config_dict
        self.family: Family = family_for(SimpleNamespace(architectures=d.get("architectures"), model_type=d.get("model_type")))
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

    @cached_property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise QuantError(f"{self.path}: shard files listed in the index are missing: {missing}")
            return weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise QuantError(
                f"{self.path} has no .safetensors weights (only safetensors are read); "
                f"convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
            )
        weight_map = {}
        for f in files:
            with safe_open(f, framework="pt") as fh:
                weight_map.update({k: f.name for k in fh.keys()})
        return weight_map

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise QuantError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.path / fname, framework="pt")
        return self._handles[fname].get_tensor(name)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix.`` with the prefix stripped."""
        p = prefix + "."
        return {k[len(p):]: self.tensor(k) for k in self.weight_map if k.startswith(p)}

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def dtype(self) -> torch.dtype:
        d = self.config_dict.get("dtype") or self.config_dict.get("torch_dtype") or "float16"
        return getattr(torch, d)


class BlockBuilder:
    """Materializes decoder block ``i`` from its tensors in the checkpoint, as a ``DecoderBlock`` of ``spec``."""

    def __init__(self, source: ModelSource, spec: BlockSpec, device: torch.device, dtype: torch.dtype):
        self.source, self.spec, self.device, self.dtype = source, spec, device, dtype

    def block(self, i: int) -> torch.nn.Module:
        fam = self.source.family
        with torch.device("meta"):  # shapes only: the checkpoint's tensors are assigned in below
            layer = DecoderBlock(self.spec)
        state = self.source.tensors(f"{fam.layers}.{i}")
        expected = set(layer.state_dict())
        if set(state) != expected:
            raise QuantError(
                f"block {i}: checkpoint tensors do not match the config's architecture "
                f"(missing {sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]})"
            )
        # checked where the block will live: on a GPU this is instant, on the host it costs ~1 s per 7B block
        state = {name: t.to(self.device) for name, t in state.items()}
        for name, t in state.items():
            if not torch.isfinite(t).all():
                raise QuantError(f"block {i}: weight {name} contains NaN or inf; the source model is damaged")
        # assigned, not copied into ``to_empty`` storage: meta ``empty_like`` imports sympy (~3 s of a cold
        # worker's first block on the H100 machine)
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.to(self.dtype).eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.source.tensor(f"{self.source.family.embed}.weight")
        return torch.nn.functional.embedding(ids, w).to(self.dtype)


def rotary_embeddings(source: ModelSource, seqlen: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``(cos, sin)`` ``[1, seqlen, head_dim]`` for positions ``0..seqlen-1``, from transformers' own rotary
    embedding of the architecture (every scaling variant is its business); computed once, on the driver."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(source.config)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg).get_submodule(source.family.rotary)
    with torch.device(device):  # the constructor's device argument differs across versions
        rotary = type(meta)(config=cfg)
    pos = torch.arange(seqlen, device=device)[None]
    cos, sin = rotary(torch.zeros(1, seqlen, 1, dtype=dtype, device=device), pos)
    return cos.to(dtype), sin.to(dtype)
