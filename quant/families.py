"""Per-family layer maps: which linears AWQ smooths together and what feeds them.

Adding a family that follows the Llama block layout is one entry in ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import QuantError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input, the op before them that absorbs ``1/s``, and what to measure.

    ``inspect`` is the sub-module whose output MSE judges a scale (empty: the first linear itself).
    """

    prev: str
    linears: tuple[str, ...]
    inspect: str = ""


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # Block options fixed by the architecture; None: read from the config (attention_bias, mlp_bias)
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: bool = False  # an RMSNorm on each query and key head (Qwen3)

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a block that gets quantized, in checkpoint order."""
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)

    @property
    def no_clip(self) -> tuple[str, ...]:
        """q and k are not clipped (their error is amplified by the softmax; the reference skips them)."""
        return (self.q, self.k)

    def scale_groups(self, v_out: int, o_in: int) -> list[ScaleGroup]:
        """The four smoothing groups; ``v -> o`` only when v's output feeds o one to one (no GQA)."""
        groups = [ScaleGroup(self.attn_norm, (self.q, self.k, self.v), self.attn)]
        if v_out == o_in:
            groups.append(ScaleGroup(self.v, (self.o,)))
        groups.append(ScaleGroup(self.mlp_norm, (self.gate, self.up), self.mlp))
        groups.append(ScaleGroup(self.up, (self.down,)))
        return groups


FAMILIES: tuple[Family, ...] = (
    Family(("LlamaForCausalLM",), ("llama",)),
    Family(("MistralForCausalLM",), ("mistral",), qkv_bias=False, o_bias=False, mlp_bias=False),
    Family(("Qwen2ForCausalLM",), ("qwen2",), qkv_bias=True, o_bias=False, mlp_bias=False),
    Family(("Qwen3ForCausalLM",), ("qwen3",), mlp_bias=False, qk_norm=True),
)


def supported_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.architectures]


def family_for(config) -> Family:
    """The family of a transformers config, or a QuantError that lists what is supported."""
    archs = tuple(getattr(config, "architectures", None) or ())
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs) or model_type in fam.model_types:
            return fam
    raise QuantError(
        f"unsupported architecture {list(archs) or model_type!r}; supported: {', '.join(supported_architectures())}"
    )
