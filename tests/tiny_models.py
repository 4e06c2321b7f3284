"""Tiny real-architecture models and a small BPE tokenizer, made from a config, for CPU tests.

Nothing is downloaded: the tokenizer is trained on the shared WikiText text (or on built-in text if
shared/ is absent), the weights are random but seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIB_FILE = SHARED_DATA / "wikitext2-valid.tokens"
EVAL_FILE = SHARED_DATA / "wikitext2-test.raw"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ARCHS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"]),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
}


def sample_text(max_chars: int = 400_000) -> str:
    """Training text for the tokenizer: the shared WikiText validation split, or a built-in fallback."""
    if CALIB_FILE.exists():
        return CALIB_FILE.read_text(encoding="utf-8")[:max_chars]
    words = "the of and to in a is was for on as with by he it at from his an were are which".split()
    g = torch.Generator().manual_seed(0)
    return " ".join(words[int(i)] for i in torch.randint(len(words), (50_000,), generator=g))


def train_tokenizer(out_dir: Path, vocab_size: int = 512):
    """A byte-level BPE trained on ``sample_text``, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sample_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, vocab_size: int = 512, **overrides):
    """A small config of a real architecture with GQA (4 query heads, 2 KV heads)."""
    from transformers import AutoConfig

    base = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=4, pad_token_id=2,
    )
    base.update(overrides)
    spec = ARCHS[arch]
    cfg = AutoConfig.for_model(spec["model_type"], **base)
    cfg.architectures = spec["architectures"]
    return cfg


def make_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, outliers: bool = True,
                    dtype: torch.dtype = torch.float32, tokenizer_dir: Path | None = None, **overrides) -> Path:
    """Write a random tiny model directory (config, safetensors, tokenizer).

    ``outliers`` scales a few norm channels up so that activations have the outlier channels real LLMs have
    and AWQ exists for; without them scale search has nothing to find.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
        if outliers:
            g = torch.Generator().manual_seed(seed + 1)
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    idx = torch.randperm(norm.weight.numel(), generator=g)[:4]
                    norm.weight[idx] *= 20.0
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    else:
        train_tokenizer(out_dir, vocab_size=cfg.vocab_size)
    return out_dir


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
