"""Tool calls in model output, for the two formats of the families we serve.

* Qwen2/2.5/3 (Hermes style)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* Llama-3.1/3.2 (JSON-based tool calling; ``<|python_tag|>`` may precede it, several calls may be joined by
  ``;``)::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

``parse`` takes the whole output text; ``StreamSplitter`` decides, while streaming, which text is plain
content (sent at once) and which may be a tool call (held back until the end, then parsed).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (HERMES_OPEN, PYTHON_TAG)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
FORMATS = ("auto", "hermes", "llama3", "none")


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire form)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def _call(obj) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_objects(text: str) -> list | None:
    """``text`` as one JSON value, or as JSON objects joined by ``;`` / whitespace; None if it is not."""
    dec = json.JSONDecoder()
    out, i, n = [], 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n;":
            i += 1
        if i == n:
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.extend(obj if isinstance(obj, list) else [obj])
    return out


def parse_hermes(text: str) -> tuple[str, list[ParsedCall]]:
    start = text.find(HERMES_OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in _HERMES.findall(text[start:]):
        objs = _json_objects(body)
        parsed = [_call(o) for o in objs] if objs else [None]
        if any(c is None for c in parsed):
            return text, []  # malformed: give the text back rather than half the calls
        calls += parsed
    return text[:start].strip(), calls


def parse_llama3(text: str) -> tuple[str, list[ParsedCall]]:
    body = text.strip()
    prefix = ""
    tag = body.find(PYTHON_TAG)
    if tag >= 0:
        prefix, body = body[:tag].strip(), body[tag + len(PYTHON_TAG):].strip()
    if not body.startswith(("{", "[")):
        return text, []
    objs = _json_objects(body)
    if not objs:
        return text, []
    calls = [_call(o) for o in objs]
    if any(c is None for c in calls):
        return text, []
    return prefix, calls


def parse(text: str, fmt: str = "auto") -> tuple[str, list[ParsedCall]]:
    """(content left over, tool calls); no calls means the text is all content."""
    if fmt == "none":
        return text, []
    if fmt in ("auto", "hermes") and HERMES_OPEN in text:
        content, calls = parse_hermes(text)
        if calls or fmt == "hermes":
            return content, calls
    if fmt in ("auto", "llama3"):
        return parse_llama3(text)
    return text, []


def format_for_template(template: str | None) -> str:
    """The tool format a chat template teaches its model (auto when it says nothing)."""
    t = template or ""
    if HERMES_OPEN in t:
        return "hermes"
    if "python_tag" in t or "<|eom_id|>" in t:
        return "llama3"
    return "auto"


class StreamSplitter:
    """Streams content at once until what follows could be a tool call; holds that back for ``finish``.

    Holds back a possible tool call: text from a marker on, output that starts with ``{``/``[`` (Llama-3's
    bare JSON), and a trailing partial marker (``<tool`` could become ``<tool_call>``).
    """

    def __init__(self, fmt: str = "auto"):
        self.fmt = fmt
        self.text = ""
        self.sent = 0
        self.holding = False

    def feed(self, delta: str) -> str:
        """Content safe to send now."""
        self.text += delta
        if self.holding or self.fmt == "none":
            if self.fmt == "none":
                out, self.sent = self.text[self.sent:], len(self.text)
                return out
            return ""
        if self.fmt in ("auto", "llama3") and self.sent == 0:
            lead = self.text.lstrip()
            if not lead:
                return ""
            if lead[0] in "{[":
                self.holding = True
                return ""
        idx = min((i for i in (self.text.find(m, self.sent) for m in MARKERS) if i >= 0), default=-1)
        if idx >= 0:
            self.holding = True
            out, self.sent = self.text[self.sent:idx], idx
            return out
        end = len(self.text)
        for m in MARKERS:  # keep back a suffix that may grow into a marker
            for k in range(min(len(m) - 1, end - self.sent), 0, -1):
                if self.text.endswith(m[:k]):
                    end = min(end, len(self.text) - k)
                    break
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(content still to send, tool calls) at the end of the output."""
        rest = self.text[self.sent:]
        if not rest:
            return "", []
        if self.fmt != "none":
            content, calls = parse(rest, self.fmt)
            if calls:
                return content, calls
        return rest, []
