"""One request's state: its tokens, how many of them are in the KV cache, its blocks, why it stopped."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from ..sampling_params import GenerationConfig


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_counter = itertools.count()


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]                  # prompt + output
    params: GenerationConfig
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0          # tokens whose K/V are in the cache
    num_cached_tokens: int = 0            # of the prompt, served by the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash of each full, computed block
    status: Status = Status.WAITING
    finish_reason: str | None = None      # stop | length | abort | error
    arrival: int = field(default_factory=lambda: next(_counter))
    logprobs: list = field(default_factory=list)           # per output token: {token_id: logprob}
    max_total_tokens: int = 0             # prompt + max_new_tokens, capped by the context
    prompt_logprobs: list | None = None   # per prompt position (None for the first), when asked for
    prompt_top_logprobs: list | None = None  # per prompt position {token_id: logprob}, when a top n is asked for

    def __post_init__(self):
        self.num_prompt_tokens = len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
