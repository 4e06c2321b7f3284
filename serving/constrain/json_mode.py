"""``response_format: json_object`` as a decoding constraint: the output is one JSON object, always.

A token is allowed when the output with it is still a prefix of a JSON object (:class:`JsonState`);
end-of-sequence only once the object is complete, and then nothing else. The sampler asks ``allows`` for its
best-ranked candidates in order, so greedy decoding takes the best allowed token and sampling draws from the
distribution restricted to allowed tokens. An output cut by ``max_tokens`` can still end mid-object
(``finish_reason: length``), as in vLLM.
"""

from __future__ import annotations

from typing import Callable

from .json_prefix import JsonState


class JsonObjectConstraint:
    def __init__(self, token_text: Callable[[int], str], end_ids: set[int], special_ids: set[int]):
        self.token_text, self.end_ids, self.special_ids = token_text, set(end_ids), set(special_ids)
        self.state = JsonState()

    def allows(self, token_id: int) -> bool:
        if token_id in self.end_ids:
            return self.state.complete
        if self.state.complete or token_id in self.special_ids:
            return False
        text = self.token_text(token_id)
        return bool(text) and self.state.feed(text) is not None

    def advance(self, token_id: int) -> None:
        """Record the token the sampler chose (always one ``allows`` accepted)."""
        if token_id in self.end_ids:
            return
        nxt = self.state.feed(self.token_text(token_id))
        if nxt is not None:
            self.state = nxt
