"""Tokenizer helpers: load, chat templates, incremental detokenization with stop strings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, chat_template: str | None = None):
    """The model directory's tokenizer; None (token ids only) when the directory has none. ``chat_template``
    (a Jinja template or a file holding one, see :func:`resolve_chat_template`) replaces the tokenizer's own."""
    from transformers import AutoTokenizer

    from .config import CheckpointError

    if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        if chat_template:
            raise CheckpointError(f"{path} has no tokenizer, so a chat template cannot be used: add the "
                                  "tokenizer files or drop the chat template")
        logging.getLogger(__name__).warning("%s has no tokenizer: the engine takes token ids only", path)
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({e})") from e
    if chat_template:
        tok.chat_template = resolve_chat_template(chat_template)
    return tok


def engine_tokenizer(model_path: str | Path | None, tokenizer=None, chat_template: str | None = None):
    """The tokenizer an engine uses: the one given, else the model directory's (None without either);
    ``chat_template`` replaces its template either way."""
    if tokenizer is None:
        return load_tokenizer(model_path, chat_template) if model_path is not None else None
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    return tokenizer


def resolve_chat_template(value: str) -> str:
    """A chat template given as Jinja text or as the path of a file holding it (vLLM's ``--chat-template``): text
    when it has a brace or a line break, else a path. Its syntax is checked here, so a bad template fails at load
    with the line it breaks on, not on the first chat request."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not any(c in value for c in "{}\n"):
        p = Path(value).expanduser()
        if not p.is_file():
            raise ValueError(f"chat template file {value!r} not found (pass the path of a Jinja file, or the "
                             "template itself)")
        value = p.read_text()
    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(value)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template: {e.message} (line {e.lineno})") from e
    return value


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass a plain prompt instead of messages")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(prompt)


@dataclass
class Detokenizer:
    """Turns a growing list of output tokens into text, a piece at a time (no quadratic re-decoding).

    ``hold`` characters at the end are kept back from the stream while they could still be the start of a
    stop string.
    """

    tokenizer: object
    skip_special_tokens: bool = True
    stop_words: list[str] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    prefix_offset: int = 0
    read_offset: int = 0

    def update(self, output_ids: list[int]) -> bool:
        """Decode the new tokens; True when a stop string appeared (the text is cut before it)."""
        tok = self.tokenizer
        prefix = tok.decode(output_ids[self.prefix_offset:self.read_offset],
                            skip_special_tokens=self.skip_special_tokens)
        full = tok.decode(output_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(output_ids)
            start = max(0, len(self.text) - max((len(s) for s in self.stop_words), default=0))
            self.text += new
            for s in self.stop_words:
                i = self.text.find(s, start)
                if i >= 0:
                    self.text = self.text[:i]
                    return True
        return False

    def flush(self, output_ids: list[int]) -> None:
        """At the end: whatever is still pending (an incomplete character) goes out as decoded."""
        tok = self.tokenizer
        prefix = tok.decode(output_ids[self.prefix_offset:self.read_offset],
                            skip_special_tokens=self.skip_special_tokens)
        full = tok.decode(output_ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
        self.prefix_offset = self.read_offset = len(output_ids)

    def delta(self, final: bool) -> str:
        """Text not yet streamed; holds back a possible stop-string prefix unless ``final``."""
        end = len(self.text)
        if not final and self.stop_words:
            end = max(self.emitted, end - (max(len(s) for s in self.stop_words) - 1))
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
