"""Grammars as decoding constraints, through xgrammar: JSON Schema (``response_format: json_schema``, tool
arguments) and vLLM's ``guided_regex`` / ``guided_choice``.

xgrammar compiles the schema into a grammar over the tokenizer's vocabulary; at each step its matcher gives the
tokens that keep the output a prefix of a document the schema accepts (a bitmask over the vocabulary), and the
sampler takes the best-ranked of them. End-of-sequence is allowed once the document is whole. Separators are fixed
(``", "``, ``": "``) and there is no other whitespace between tokens, as in OpenAI's structured outputs. The grammar
compiler is made once per engine (it holds the vocabulary) and caches compiled schemas.
"""

from __future__ import annotations

import functools
import json
import re

import torch

from ..config import InvalidRequestError


_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")  # xgrammar's "[time] file.cc:line: " before a message


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether xgrammar is installed (json_schema requests and schema-held tool arguments need it)."""
    import importlib.util

    return importlib.util.find_spec("xgrammar") is not None


class SchemaCompiler:
    """Per engine: the tokenizer's vocabulary as xgrammar sees it, and a cache of compiled schemas."""

    def __init__(self, tokenizer, vocab_size: int, end_ids: set[int]):
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise InvalidRequestError("response_format json_schema and guided_regex / guided_choice need the "
                                      "xgrammar package on the server (pip install xgrammar); json_object works "
                                      "without it") from e
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(end_ids))
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self.vocab_size = vocab_size
        self.stop_ids = set(end_ids)

    def constraint(self, schema: dict | str | list, end_ids: set[int], prefix: str | tuple[str, ...] = "",
                   suffix: str = "") -> "JsonSchemaConstraint":
        """The output is ``prefix`` + one document ``schema`` accepts + ``suffix``. ``prefix`` may be alternatives
        (a forced tool call: one per tool), each with its own schema when ``schema`` is a list of them."""
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        schemas = list(schema) if isinstance(schema, list) else [schema] * len(prefixes)
        if len(schemas) != len(prefixes):
            raise InvalidRequestError(f"json_schema: {len(schemas)} schemas for {len(prefixes)} prefixes")
        texts = [s if isinstance(s, str) else json.dumps(s) for s in schemas]
        xgr = self.xgr
        try:
            # separators fixed (", " and ": "), no free whitespace: free whitespace lets a model loop on it
            if prefixes == ("",) and not suffix:
                grammar = self.compiler.compile_json_schema(texts[0], any_whitespace=False)
            else:
                alts = [xgr.Grammar.from_json_schema(t, any_whitespace=False) for t in texts]
                alts = [xgr.Grammar.concat(_literal(xgr, p), g) if p else g for p, g in zip(prefixes, alts)]
                body = alts[0] if len(alts) == 1 else xgr.Grammar.union(*alts)
                grammar = self.compiler.compile_grammar(
                    xgr.Grammar.concat(body, _literal(xgr, suffix)) if suffix else body)
        except Exception as e:  # xgrammar reports a schema it cannot take as RuntimeError / ValueError
            raise _refused("json_schema", e) from e
        return JsonSchemaConstraint(self.xgr, grammar, self.vocab_size, set(end_ids), self.stop_ids)

    def pattern_constraint(self, end_ids: set[int], regex: str | None = None,
                           choice: list[str] | None = None) -> "JsonSchemaConstraint":
        """vLLM's ``guided_regex`` (the whole output matches it) or ``guided_choice`` (it is one of the strings)."""
        xgr = self.xgr
        try:
            if regex is not None:
                grammar = self.compiler.compile_regex(regex)
            else:
                alts = [_literal(xgr, c) for c in choice]
                grammar = self.compiler.compile_grammar(alts[0] if len(alts) == 1 else xgr.Grammar.union(*alts))
        except Exception as e:
            raise _refused("guided_regex" if regex is not None else "guided_choice", e) from e
        return JsonSchemaConstraint(xgr, grammar, self.vocab_size, set(end_ids), self.stop_ids)


def _refused(field: str, e: Exception) -> InvalidRequestError:
    """xgrammar's first line about what it could not compile, without its log prefix, named by the field."""
    first = (str(e).strip().splitlines() or [repr(e)])[0]
    return InvalidRequestError(f"{field}: " + _LOG_PREFIX.sub("", first))


def _literal(xgr, text: str):
    """A grammar of exactly ``text`` (an EBNF string literal: JSON's escapes)."""
    return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text, ensure_ascii=False))


class JsonSchemaConstraint:
    """One request's matcher: ``allows`` / ``token_mask`` for the sampler, ``advance`` with the chosen token."""

    def __init__(self, xgr, grammar, vocab_size: int, end_ids: set[int], stop_ids: set[int]):
        self.vocab_size = vocab_size
        self.matcher = xgr.GrammarMatcher(grammar)
        self.end_ids, self.stop_ids = end_ids, stop_ids
        self._bits = xgr.allocate_token_bitmask(1, vocab_size)
        self._mask: torch.Tensor | None = None  # bool [vocab] for the current state, made on first use

    def token_mask(self, vocab_size: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Allowed tokens now, as a bool vector over the vocabulary (padded to ``vocab_size`` with False)."""
        if self._mask is None:
            self.matcher.fill_next_token_bitmask(self._bits)
            words = self._bits[0].to(torch.int64) & 0xFFFFFFFF
            bits = (words[:, None] >> torch.arange(32)) & 1
            mask = bits.flatten()[: self.vocab_size].bool()
            # this request's own stop ids end it like the tokenizer's: allowed when the document is whole
            extra = [t for t in self.end_ids - self.stop_ids if t < self.vocab_size]
            if extra:
                mask[extra] = any(bool(mask[t]) for t in self.stop_ids if t < self.vocab_size)
            self._mask = mask
        mask = self._mask
        if vocab_size is not None and vocab_size != mask.numel():
            mask = torch.cat([mask, mask.new_zeros(max(0, vocab_size - mask.numel()))])[:vocab_size]
        return mask.to(device)

    def allows(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and bool(self.token_mask()[token_id])

    def advance(self, token_id: int) -> None:
        """Record the token the sampler chose (always one ``allows`` accepted)."""
        if token_id in self.end_ids and token_id not in self.stop_ids:
            return  # a request stop id: the sequence ends here, the matcher has nothing to learn
        self.matcher.accept_token(token_id)
        self._mask = None
