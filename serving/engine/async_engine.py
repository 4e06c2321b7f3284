"""An ``LLMEngine`` driven by a background thread, for servers: thread-safe submit and abort, streams of
outputs for threads (``stream``) and for asyncio (``generate``). The engine itself stays single-threaded:
only the loop thread touches it."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Callable, Iterator

from .llm_engine import LLMEngine, RequestOutput

log = logging.getLogger(__name__)
Sink = Callable[[RequestOutput], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, prompt, gen_config=None, sink: Sink | None = None, request_id: str | None = None) -> str:
        """Queue a request; returns its id once the engine accepted it (or raises why it did not)."""
        return self._put(prompt, gen_config, sink, request_id).result()

    def _put(self, prompt, gen_config, sink: Sink | None, request_id: str | None) -> Future:
        """Queue a request without waiting: the future gets its id (or the reason it was refused) when the
        loop thread takes it, at the next step boundary; a future cancelled before that queues nothing."""
        fut: Future = Future()
        self._inbox.put(("add", (prompt, gen_config, request_id), sink or (lambda o: None), fut))
        self._wake.set()
        return fut

    def abort(self, request_id: str) -> None:
        """Cancel; the request's KV blocks are freed before the next step."""
        self._inbox.put(("abort", request_id, None, None))
        self._wake.set()

    def run(self, fn: Callable[[LLMEngine], object]) -> Future:
        """``fn(engine)`` on the loop thread at the next step boundary (the engine is single-threaded); the
        future gets its result or its exception."""
        fut: Future = Future()
        self._inbox.put(("run", fn, None, fut))
        self._wake.set()
        return fut

    def stream(self, prompt, gen_config=None) -> Iterator[RequestOutput]:
        """Blocking iterator of outputs (for threads); leaving it early cancels the request."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        rid = self.submit(prompt, gen_config, q.put)
        try:
            while True:
                out = q.get()
                yield out
                if out.finished:
                    return
        finally:
            self.abort(rid)

    async def generate(self, prompt, gen_config=None, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Async iterator of outputs; cancelling the consuming task cancels the request.

        The request is queued from the event loop itself (no executor thread blocked until the next step
        boundary: a burst of arrivals is not capped by the default pool's size, and there is one thread hop
        less before the first token)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        fut = self._put(prompt, gen_config, lambda o: loop.call_soon_threadsafe(q.put_nowait, o), request_id)
        try:
            rid = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._abort_accepted)  # taken meanwhile: free it once it is in
            raise
        try:
            while True:
                out = await q.get()
                yield out
                if out.finished:
                    return
        finally:
            self.abort(rid)

    def _abort_accepted(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.abort(fut.result())

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # only the loop thread may touch the engine
            self.engine.close()

    # -- the loop thread ---------------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                kind, arg, sink, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort(arg)
                self._sinks.pop(arg, None)
                continue
            if kind == "run":
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(arg(self.engine))
                    except Exception as e:
                        fut.set_exception(e)
                continue
            prompt, gen, rid = arg
            if not fut.set_running_or_notify_cancel():  # the caller went away before its turn
                continue
            try:
                rid = self.engine.add_request(prompt, gen, request_id=rid, stream=True)
            except Exception as e:
                fut.set_exception(e)
                continue
            self._sinks[rid] = sink
            fut.set_result(rid)

    def _loop(self) -> None:
        while not self._stop:
            self._drain()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for out in self.engine.step():
                sink = self._sinks.get(out.request_id)
                if out.finished:
                    self._sinks.pop(out.request_id, None)
                if sink is not None:
                    try:
                        sink(out)
                    except Exception:  # a consumer's failure is not the engine's
                        log.exception("output sink failed")
