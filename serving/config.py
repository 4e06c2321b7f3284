"""Configuration: what the engine is asked to do (EngineConfig) and what the checkpoint is (ModelConfig)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be served: files missing, shapes that disagree with config.json, unknown format."""


class InvalidRequestError(ValueError):
    """A request the engine refuses (prompt too long, impossible sampling values); other requests go on."""


@dataclass
class EngineConfig:
    """Engine knobs, named after LMDeploy's ``TurbomindEngineConfig`` / vLLM's ``EngineArgs`` where they overlap."""

    model_format: str = "auto"            # auto | awq | hf
    dtype: str = "auto"                   # auto | float16 | bfloat16 | float32
    device: str | None = None             # default: cuda if available, else cpu
    session_len: int | None = None        # max tokens (prompt + output) of one sequence; default: the model's
    max_num_seqs: int = 128               # sequences decoded together
    max_num_batched_tokens: int = 4096    # token budget of one step (chunked prefill splits longer prompts)
    block_size: int = 64                  # tokens per KV block
    cache_max_entry_count: float = 0.8    # fraction of free GPU memory (after the weights) given to the KV cache
    num_kv_blocks: int | None = None      # explicit KV block count (wins over the fraction)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False           # no CUDA graphs
    cuda_graph_max_bs: int | None = None  # largest decode batch captured (default max_num_seqs)
    async_scheduling: bool = True         # queue decode step t+1 before reading step t's tokens (see LLMEngine)
    tune_kernels: bool = False            # autotune W4A16 configs missing from kernels/' table (seconds each)
    repack_weights: bool = True           # AWQ weights into the tensor cores' fragment order at load (sm_90, bf16 or fp16)
    progress: bool = True                 # weight-loading progress bar
    tp: int = 1                           # tensor-parallel world size (ranks 1.. are Ray actors: serving/tp_group.py)
    chat_template: str | None = None      # Jinja chat template (or a file holding one) replacing the tokenizer's
    tp_symmetric_memory: bool = True      # GPU tp > 1: decode-sized all-reduces via symmetric memory (docs/engine.md)

    def __post_init__(self):
        if self.model_format not in ("auto", "awq", "hf"):
            raise ValueError(f"model_format must be auto, awq or hf, got {self.model_format!r}")
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be auto, float16, bfloat16 or float32, got {self.dtype!r}")
        if not 0.0 < self.cache_max_entry_count <= 1.0:
            raise ValueError("cache_max_entry_count must lie in (0, 1]")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.tp < 1:
            raise ValueError(f"tp (tensor-parallel ranks) must be at least 1, got {self.tp}")


@dataclass
class QuantConfig:
    """AWQ 4-bit, AutoAWQ GEMM layout."""

    group_size: int
    modules_to_not_convert: list[str] = field(default_factory=list)

    def applies_to(self, prefix: str) -> bool:
        return not any(m and m in prefix for m in self.modules_to_not_convert)


_ARCHS = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ModelConfig:
    """The parts of a HF ``config.json`` the runner needs, validated once."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    dtype: torch.dtype
    quant: QuantConfig | None
    eos_token_ids: list[int]
    raw: dict

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], model_format: str = "auto", dtype: str = "auto") -> "ModelConfig":
        arch = (cfg.get("architectures") or [None])[0]
        family = _ARCHS.get(arch) or {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2",
                                      "qwen3": "qwen3"}.get(cfg.get("model_type", ""))
        if family is None:
            raise CheckpointError(f"unsupported architecture {arch or cfg.get('model_type')!r}; "
                                  f"supported: {', '.join(_ARCHS)}")
        quant = _parse_quant(cfg, model_format)
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            out = cls(
                family=family,
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rope_theta=theta,
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=True if family == "qwen2" else bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=family == "qwen3",
                dtype=_pick_dtype(cfg, dtype, quant),
                quant=quant,
                eos_token_ids=_as_list(cfg.get("eos_token_id")),
                raw=cfg,
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r}") from None
        if out.num_heads % out.num_kv_heads:
            raise CheckpointError(f"num_attention_heads {out.num_heads} is not a multiple of "
                                  f"num_key_value_heads {out.num_kv_heads}")
        window = cfg.get("sliding_window")
        if window and (family == "mistral" or cfg.get("use_sliding_window")):
            # No sliding-window attention kernel: cap the context at the window, where full attention is exact.
            out.max_position_embeddings = min(out.max_position_embeddings, int(window))
        return out

    @classmethod
    def from_path(cls, path: str | Path, model_format: str = "auto", dtype: str = "auto") -> "ModelConfig":
        p = Path(path)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p}: no config.json (not a model directory?)")
        cfg = json.loads((p / "config.json").read_text())
        gen = p / "generation_config.json"
        out = cls.from_dict(cfg, model_format, dtype)
        if gen.is_file():
            extra = _as_list(json.loads(gen.read_text()).get("eos_token_id"))
            out.eos_token_ids = sorted(set(out.eos_token_ids) | set(extra))
        return out


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def _parse_quant(cfg: dict, model_format: str) -> QuantConfig | None:
    q = cfg.get("quantization_config")
    if model_format == "hf":
        if q:
            raise CheckpointError("model_format='hf' but config.json has a quantization_config "
                                  f"({q.get('quant_method')}); use model_format='auto' or 'awq'")
        return None
    if not q:
        if model_format == "awq":
            raise CheckpointError("model_format='awq' but config.json has no quantization_config")
        return None
    method = str(q.get("quant_method", "")).lower()
    if method != "awq":
        raise CheckpointError(f"unsupported quantization method {method!r} (only AWQ)")
    if int(q.get("bits", q.get("w_bit", 4))) != 4:
        raise CheckpointError(f"only 4-bit AWQ is supported, got bits={q.get('bits')}")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"AWQ version {version!r} is not supported (only the GEMM layout)")
    if not q.get("zero_point", True):
        raise CheckpointError("AWQ without zero points is not supported")
    g = int(q.get("group_size", q.get("q_group_size", 128)))
    return QuantConfig(group_size=g, modules_to_not_convert=list(q.get("modules_to_not_convert") or []))


def _pick_dtype(cfg: dict, dtype: str, quant: QuantConfig | None) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").replace("torch.", "")
    if quant is not None:
        return torch.bfloat16 if name == "bfloat16" else torch.float16
    return _DTYPES.get(name, torch.float32 if not torch.cuda.is_available() else torch.bfloat16)
