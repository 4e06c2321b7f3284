"""Read a Hugging Face model lazily: config, tokenizer, and one decoder block at a time from safetensors.

The whole model never sits in memory: a meta-device skeleton gives the module structure, and a block's
tensors are read with ``safe_open`` only when that block is processed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open

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
    """A model directory opened for reading tensors by name, one file handle per shard."""

    def __init__(self, model: str | Path):
        from transformers import AutoConfig

        self.path = resolve_model_dir(str(model))
        if not (self.path / "config.json").is_file():
            raise QuantError(f"{self.path} has no config.json; pass a Hugging Face model directory")
        self.config = AutoConfig.from_pretrained(self.path)
        self.family: Family = family_for(self.config)
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

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
        d = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None) or torch.float16
        return getattr(torch, d) if isinstance(d, str) else d


class BlockBuilder:
    """Materializes decoder block ``i`` (and the rotary embedding) from a meta-device skeleton."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.source, self.device, self.dtype = source, device, dtype
        cfg = copy.deepcopy(source.config)
        cfg.use_cache = False
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        self.config = cfg

    def _module(self, dotted: str) -> torch.nn.Module:
        return self.skeleton.get_submodule(dotted)

    def block(self, i: int) -> torch.nn.Module:
        fam = self.source.family
        layer = copy.deepcopy(self._module(fam.layers)[i])
        layer.to_empty(device=self.device)
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
        layer.load_state_dict(state, strict=True)
        return layer.to(self.dtype).eval()

    def rotary(self) -> torch.nn.Module:
        meta = self._module(self.source.family.rotary)
        with torch.device(self.device):  # the constructor's device argument differs across versions
            return type(meta)(config=self.config)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.source.tensor(f"{self.source.family.embed}.weight")
        return torch.nn.functional.embedding(ids, w).to(self.dtype)
