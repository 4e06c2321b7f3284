"""An incremental JSON recogniser over characters: is this text a prefix of some JSON object?

Stricter than JSON in one way: no whitespace before the object and at most ``MAX_WS_RUN`` in a row outside
strings. The state is a small immutable tuple, so checking a candidate token is ``state.feed(token_text)`` on a copy
and never disturbs the request's own state. Used by :mod:`serving.constrain.json_mode` to mask tokens that
would make the output invalid (OpenAI's ``response_format: json_object``: the whole output is one JSON object,
whitespace around it allowed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

WS = " \t\n\r"
# Whitespace outside strings: none before the object, at most this many characters in a row after that
# (room for pretty-printing), so a model that prefers newlines cannot pad to max_tokens without writing JSON.
MAX_WS_RUN = 16
HEX = "0123456789abcdefABCDEF"
LITERALS = ("true", "false", "null")

# modes
VALUE, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, AFTER_VALUE, OBJ_KEY_OR_END, OBJ_KEY, COLON, ARR_VALUE_OR_END, DONE = range(12)


@dataclass(frozen=True)
class JsonState:
    """``stack``: open containers ('{' or '['); ``mode``; ``aux``: literal/number text or \\u digits so far;
    ``key``: the open string is an object key; ``ws``: whitespace characters in a row outside strings."""

    stack: tuple[str, ...] = ()
    mode: int = VALUE
    aux: str = ""
    key: bool = False
    started: bool = False
    ws: int = 0

    @property
    def complete(self) -> bool:
        """A whole top-level object has been read (only whitespace may follow)."""
        return self.mode == DONE

    def feed(self, text: str) -> "JsonState | None":
        """The state after ``text``, or None if ``text`` cannot continue a JSON object."""
        st: JsonState | None = self
        for ch in text:
            st = st._step(ch)
            if st is None:
                return None
        return st

    # -- one character ----------------------------------------------------------------------------------
    def _close_value(self, stack: tuple[str, ...]) -> "JsonState":
        """A value just ended: at top level the document is done, else expect ',' or the container's end."""
        if not stack:
            return JsonState((), DONE, started=True)
        return JsonState(stack, AFTER_VALUE, started=True)

    def _begin_value(self, ch: str, stack: tuple[str, ...]) -> "JsonState | None":
        if ch == "{":
            return JsonState(stack + ("{",), OBJ_KEY_OR_END, started=True)
        if not stack:  # json_object: the top level is an object
            return None
        if ch == "[":
            return JsonState(stack + ("[",), ARR_VALUE_OR_END, started=True)
        if ch == '"':
            return JsonState(stack, STRING, started=True)
        if ch == "-" or ch.isdigit():
            return JsonState(stack, NUMBER, ch, started=True)
        for lit in LITERALS:
            if lit[0] == ch:
                return JsonState(stack, LITERAL, ch, started=True)
        return None

    def _step(self, ch: str) -> "JsonState | None":
        m, stack = self.mode, self.stack
        if ch in WS and m not in (STRING, ESCAPE, UNICODE, NUMBER, LITERAL):
            if not self.started or self.ws >= MAX_WS_RUN:
                return None
            return replace(self, ws=self.ws + 1)
        if m == DONE:
            return None
        if m == STRING:
            if ch == '"':
                if self.key:
                    return JsonState(stack, COLON, started=True)
                return self._close_value(stack)
            if ch == "\\":
                return JsonState(stack, ESCAPE, key=self.key, started=True)
            if ord(ch) < 0x20:
                return None
            return self
        if m == ESCAPE:
            if ch in '"\\/bfnrt':
                return JsonState(stack, STRING, key=self.key, started=True)
            if ch == "u":
                return JsonState(stack, UNICODE, "", key=self.key, started=True)
            return None
        if m == UNICODE:
            if ch not in HEX:
                return None
            aux = self.aux + ch
            if len(aux) == 4:
                return JsonState(stack, STRING, key=self.key, started=True)
            return JsonState(stack, UNICODE, aux, key=self.key, started=True)
        if m == NUMBER:
            if ch in "0123456789+-.eE":
                cand = self.aux + ch
                return JsonState(stack, NUMBER, cand, started=True) if _number_prefix(cand) else None
            if not _number_complete(self.aux):
                return None
            return self._close_value(stack)._step(ch)
        if m == LITERAL:
            cand = self.aux + ch
            for lit in LITERALS:
                if lit == cand:
                    return self._close_value(stack)
                if lit.startswith(cand):
                    return JsonState(stack, LITERAL, cand, started=True)
            return None
        if m == VALUE:
            return self._begin_value(ch, stack)
        if m == OBJ_KEY_OR_END:
            if ch == "}":
                return self._close_value(stack[:-1])
            return JsonState(stack, STRING, key=True, started=True) if ch == '"' else None
        if m == OBJ_KEY:
            return JsonState(stack, STRING, key=True, started=True) if ch == '"' else None
        if m == COLON:
            return JsonState(stack, VALUE, started=True) if ch == ":" else None
        if m == ARR_VALUE_OR_END:
            if ch == "]":
                return self._close_value(stack[:-1])
            return self._begin_value(ch, stack)
        if m == AFTER_VALUE:
            top = stack[-1]
            if ch == ",":
                return JsonState(stack, OBJ_KEY if top == "{" else VALUE, started=True)
            if (ch == "}" and top == "{") or (ch == "]" and top == "["):
                return self._close_value(stack[:-1])
            return None
        return None


# A JSON number, and every prefix of one (for a number still being written).
NUMBER_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
NUMBER_PREFIX_RE = re.compile(r"-?(?:(?:0|[1-9]\d*)(?:\.(?:\d+(?:[eE][+-]?\d*)?)?|[eE][+-]?\d*)?)?")


def _number_prefix(s: str) -> bool:
    """Can ``s`` still grow into a JSON number?"""
    return NUMBER_PREFIX_RE.fullmatch(s) is not None


def _number_complete(s: str) -> bool:
    return NUMBER_RE.fullmatch(s) is not None
