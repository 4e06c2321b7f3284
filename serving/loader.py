"""Checkpoint reading: find the safetensors files, stream their tensors to the device, check every shape.

Names are the HF ones (``model.layers.0.self_attn.q_proj.qweight``); fused layers take their parts through
the model's ``packed_modules`` map. A missing file, an unexpected or missing tensor, or a shape that
disagrees with config.json is a ``CheckpointError`` naming the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .config import CheckpointError
from .layers.linear import Linear

_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(path: str | Path) -> list[Path]:
    p = Path(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise CheckpointError(f"{p}: files listed in model.safetensors.index.json are missing: {missing}")
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p}: no safetensors files (model.safetensors or an index) found")
    return files


def count_tensors(files: list[Path]) -> int:
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            n += len(list(sf.keys()))
    return n


def iter_checkpoint(path: str | Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time, with a progress bar over all of them."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    files = checkpoint_files(path)
    bar = tqdm(total=count_tensors(files), desc="Loading weights", unit="tensor", disable=not progress,
               leave=False)
    try:
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)
                        bar.update(1)
            except CheckpointError:
                raise
            except Exception as e:  # a truncated or corrupt file
                raise CheckpointError(f"{f}: cannot read ({e})") from e
    finally:
        bar.close()


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into ``model`` (built for this rank), then check that nothing is missing."""
    packed = getattr(model, "packed_modules", {})
    modules = dict(model.named_modules())
    plain = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded_plain: set[str] = set()
    for name, tensor in weights:
        if name.endswith(_SKIP_SUFFIXES):
            continue
        if tied and name.startswith("lm_head."):
            continue  # some tied checkpoints store a copy; the embedding is the one used
        mod_path, attr = name.rsplit(".", 1)
        parent, _, leaf = mod_path.rpartition(".")
        shard = None
        if leaf in packed:
            fused, shard = packed[leaf]
            mod_path = f"{parent}.{fused}" if parent else fused
        module = modules.get(mod_path)
        if isinstance(module, Linear):
            module.load(attr, tensor, shard)
        elif name in plain:
            param = plain[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} does not match the config's "
                                      f"{tuple(param.shape)}")
            param.data.copy_(tensor)
            loaded_plain.add(name)
        else:
            raise CheckpointError(f"unexpected tensor {name!r} {tuple(tensor.shape)}: not part of a "
                                  f"{model.config.family} model with this config (wrong config or model_format?)")
    missing = []
    for mname, m in modules.items():
        if isinstance(m, Linear) and not (tied and mname == "lm_head"):
            for attr, shard in sorted(m.expected_names() - m.loaded, key=str):
                missing.append(f"{mname}.{attr}" + ("" if shard is None else f" [{shard}]"))
            m.loaded.clear()
    for pname in plain:
        owner = pname.rsplit(".", 1)[0]
        if not isinstance(modules.get(owner), Linear) and pname not in loaded_plain:
            if not (tied and pname == "lm_head.weight"):
                missing.append(pname)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {missing[:8]}"
                              + (" ..." if len(missing) > 8 else ""))
