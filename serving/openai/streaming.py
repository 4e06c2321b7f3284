"""Token coalescing for streamed responses: one message per stream per turn of its consumer, not per token.

Every hop of the Serve path (engine replica -> ingress -> proxy -> HTTP) costs a fixed amount of CPU per
message, so sending one message per token caps the whole server at a fixed number of tokens per second
(issue #5). Production servers (vLLM's output collector, TGI) instead merge everything a stream produced while
its consumer was busy into one message: when the consumer keeps up a message still holds one token, when it
falls behind a message holds all tokens made since the last one. ``coalesce`` merges the events of one batch,
``read_ahead`` does the waiting side of it for any async iterator of event batches.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator


def _merge_delta(into: dict, ev: dict) -> None:
    """Append delta ``ev`` to delta ``into`` (same choice): text, token ids and logprob entries."""
    into["text"] += ev["text"]
    into["token_ids"] = into["token_ids"] + ev["token_ids"]
    if ev.get("logprobs"):
        into["logprobs"] = (into.get("logprobs") or []) + ev["logprobs"]


def coalesce(events: list[dict]) -> list[dict]:
    """The events of a batch with all ``delta`` events of a choice merged into its first one.

    Per choice the order is kept (a choice's deltas come before its finish); an event's dicts are copied
    before merging, so the caller's events are never changed.
    """
    out: list[dict] = []
    open_delta: dict[int, dict] = {}  # choice index -> its merged delta in ``out`` (until its finish)
    for ev in events:
        if ev["type"] != "delta":
            open_delta.pop(ev.get("index", 0), None)
            out.append(ev)
            continue
        head = open_delta.get(ev["index"])
        if head is None:
            head = open_delta[ev["index"]] = dict(ev)
            out.append(head)
        else:
            _merge_delta(head, ev)
    return out


async def aclose_quietly(gen) -> None:
    """Close an async generator if it is one (cancelling its engine request); a failure while closing is moot."""
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass


async def read_ahead(batches: AsyncIterator[list[dict]]) -> AsyncIterator[list[dict]]:
    """Yield the batches of ``batches``, each time all that arrived while the consumer was away, coalesced.

    A task reads ``batches`` as fast as they come; the consumer gets one coalesced batch per ``__anext__``
    (at once when something is waiting). Closing this generator cancels the reader, which closes
    ``batches`` (so a client's disconnect still cancels the engine's request).
    """
    buf: list[dict] = []
    ready = asyncio.Event()
    state: dict = {"done": False, "exc": None}

    async def reader() -> None:
        try:
            async for batch in batches:
                buf.extend(batch)
                ready.set()
        except Exception as e:  # handed to the consumer, in order, after what came before it
            state["exc"] = e
        finally:
            state["done"] = True
            ready.set()

    task = asyncio.create_task(reader())
    try:
        while True:
            if not buf and not state["done"]:
                ready.clear()
                await ready.wait()
            if buf:
                events = buf[:]
                buf.clear()
                yield coalesce(events)
            elif state["done"]:
                if state["exc"] is not None:
                    raise state["exc"]
                return
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await aclose_quietly(batches)
