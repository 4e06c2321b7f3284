"""JSON as a decoding constraint: ``response_format: json_object`` and forced tool calls.

The output is ``prefix`` + one JSON object + ``suffix``, always (a forced tool call is a JSON object between
the family's literals, e.g. ``<tool_call>\\n{"name": "f", "arguments": `` ... ``}\\n</tool_call>``). A token is
allowed when the output with it is still a prefix of that language (:class:`JsonState` for the object);
end-of-sequence only once all of it is written, and then nothing else. The sampler asks ``allows`` for its
best-ranked candidates in order, so greedy decoding takes the best allowed token and sampling draws from the
distribution restricted to allowed tokens. An output cut by ``max_tokens`` can still end early
(``finish_reason: length``), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .json_prefix import JsonState

PREFIX, OBJECT, SUFFIX = range(3)


@dataclass(frozen=True)
class _Pos:
    phase: int
    offset: int  # characters of the prefix or suffix written
    obj: JsonState
    head: str = ""  # the prefix written so far (it must stay a prefix of one of the alternatives)


class JsonObjectConstraint:
    def __init__(self, token_text: Callable[[int], str], end_ids: set[int], special_ids: set[int],
                 prefix: str | tuple[str, ...] = "", suffix: str = ""):
        """``prefix``: one literal, or alternatives (one per tool for ``required``); none may be a prefix of
        another."""
        self.token_text, self.end_ids, self.special_ids = token_text, set(end_ids), set(special_ids)
        self.prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        self.suffix = suffix
        self.pos = _Pos(PREFIX if any(self.prefixes) else OBJECT, 0, JsonState())

    @property
    def complete(self) -> bool:
        return self.pos.phase == SUFFIX and self.pos.offset == len(self.suffix)

    def _feed(self, pos: _Pos, text: str) -> _Pos | None:
        for ch in text:
            if pos.phase == PREFIX:
                head = pos.head + ch
                if not any(p.startswith(head) for p in self.prefixes):
                    return None
                pos = _Pos(OBJECT, 0, pos.obj) if head in self.prefixes else _Pos(PREFIX, 0, pos.obj, head)
            elif pos.phase == OBJECT:
                obj = pos.obj.feed(ch)
                if obj is None:
                    return None
                pos = _Pos(SUFFIX, 0, obj) if obj.complete else _Pos(OBJECT, 0, obj)
            else:
                if pos.offset >= len(self.suffix) or ch != self.suffix[pos.offset]:
                    return None
                pos = _Pos(SUFFIX, pos.offset + 1, pos.obj)
        return pos

    def allows(self, token_id: int) -> bool:
        if token_id in self.end_ids:
            return self.complete
        if self.complete or token_id in self.special_ids:
            return False
        text = self.token_text(token_id)
        return bool(text) and self._feed(self.pos, text) is not None

    def advance(self, token_id: int) -> None:
        """Record the token the sampler chose (always one ``allows`` accepted)."""
        if token_id in self.end_ids:
            return
        nxt = self._feed(self.pos, self.token_text(token_id))
        if nxt is not None:
            self.pos = nxt
