"""The loop: take requests, schedule a step, run it, turn sampled tokens into outputs and stops.

Async scheduling (``EngineConfig.async_scheduling``, on by default): while a decode step runs on the GPU, the
host already queues the next one, taking its input tokens from the device, and only then reads the running
step's tokens and does its bookkeeping (stops, detokenizing, outputs). The host's per-token work then hides
behind the GPU instead of adding to it. A sequence whose token turns out to stop it has had one extra
position computed into its own (already freed) block; that row is dropped. Steps that need the host between
tokens (prefill chunks, new requests joining, preemption, JSON constraints, penalties over the output,
logprobs) run synchronously as before.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..constrain.json_mode import JsonObjectConstraint
from ..config import EngineConfig, InvalidRequestError, ModelConfig
from ..layers.parallel import SINGLE, TPContext
from ..layers.sampler import SamplingBatch
from ..loader import checkpoint_files
from ..sampling_params import GenerationConfig
from ..tokenizer import Detokenizer, apply_chat_template, encode_prompt, engine_tokenizer
from .block_manager import BlockManager
from .model_runner import ForwardBatch, ModelRunner, PendingTokens
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]               # all output tokens so far
    new_token_ids: list[int]           # tokens added by this step
    text: str = ""                     # output text so far (final when finished)
    delta_text: str = ""               # text not streamed before
    finished: bool = False
    finish_reason: str | None = None   # stop | length | abort | error
    logprobs: list | None = None       # per output token {token_id: logprob}, when asked for
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list | None = None  # when asked for: per prompt token (None for the first), at the end
    prompt_top_logprobs: list | None = None  # when asked for: per prompt token {token_id: logprob} top n


@dataclass
class _Request:
    seq: Sequence
    stop_ids: set[int]
    detok: Detokenizer | None
    stream: bool
    sent_tokens: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class _Pending:
    """A queued decode step whose tokens the host has not read yet."""

    rows: list[Sequence]
    tokens: PendingTokens


class LLMEngine:
    def __init__(self, model_path: str | Path | None = None, engine_config: EngineConfig | None = None, *,
                 hf_config: dict | None = None, weights: Iterable[tuple[str, torch.Tensor]] | None = None,
                 tokenizer=None, tp: TPContext = SINGLE):
        self.config = ecfg = engine_config or EngineConfig()
        if ecfg.tp != tp.world_size:
            raise ValueError(f"EngineConfig.tp={ecfg.tp} but this rank's TPContext has world_size={tp.world_size}: "
                             "build a tensor-parallel engine with serving.tp_group.start_tp_engine")
        if hf_config is not None:
            self.model_config = ModelConfig.from_dict(hf_config, ecfg.model_format, ecfg.dtype)
        else:
            self.model_config = ModelConfig.from_path(model_path, ecfg.model_format, ecfg.dtype)
        if weights is None:
            checkpoint_files(model_path)  # fail early, before the tokenizer, on a directory without weights
        tokenizer = engine_tokenizer(model_path, tokenizer, ecfg.chat_template)
        self.tokenizer = tokenizer
        self.runner = ModelRunner(self.model_config, ecfg, model_path=model_path, weights=weights, tp=tp)
        self.max_model_len = self.runner.max_model_len
        self.eos_ids = set(self.model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(tokenizer.eos_token_id))
        self.block_manager = BlockManager(self.runner.num_blocks, ecfg.block_size, ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, ecfg.max_num_seqs, ecfg.max_num_batched_tokens)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._token_texts: dict[int, str] = {}
        self._pending: _Pending | None = None
        self._schemas = None  # xgrammar's compiler for json_schema / guided_* requests, made on the first one
        self.followers = None  # ranks 1..N-1 when this is rank 0 of a tensor-parallel group (serving.tp_group)

    # -- requests ----------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt: ids as they are, messages through the chat template, text as it is."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: pass token ids")
        if isinstance(prompt, list):
            return apply_chat_template(self.tokenizer, prompt)
        if chat:
            return apply_chat_template(self.tokenizer, [{"role": "user", "content": prompt}])
        return encode_prompt(self.tokenizer, prompt)

    def add_request(self, prompt: str | list[int] | list[dict], params: GenerationConfig | None = None,
                    request_id: str | None = None, stream: bool = False) -> str:
        """Queue a request; raises ``InvalidRequestError`` (and queues nothing) when it cannot be served."""
        params = (params or GenerationConfig()).validate()
        ids = self.encode(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len}"
                                      " (prompt plus at least one new token)")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"token ids must lie in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidRequestError(f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary "
                                      f"[0, {vocab})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, ids, params)
        seq.max_total_tokens = min(len(ids) + params.max_new_tokens, self.max_model_len)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        detok = None
        if self.tokenizer is not None and (stream or params.stop_words):
            detok = Detokenizer(self.tokenizer, params.skip_special_tokens, list(params.stop_words))
        constraint = self._constraint(params, stop_ids or self.eos_ids)  # may refuse: before anything is queued
        self.requests[rid] = _Request(seq, stop_ids, detok, stream)
        if constraint is not None:
            self.requests[rid].extra["constraint"] = constraint
        self.scheduler.add(seq)
        return rid

    def _constraint(self, params: GenerationConfig, end_ids: set[int]):
        """The decoding constraint of a ``json_schema``, ``guided_regex`` or ``guided_choice`` request (xgrammar) or
        a ``json_mode`` one, else None."""
        grammar = params.json_schema is not None or params.guided_regex is not None or params.guided_choice is not None
        if not grammar and not params.json_mode:
            return None
        if self.tokenizer is None:
            raise InvalidRequestError("constrained decoding (json_mode, json_schema, guided_*) needs the model's "
                                      "tokenizer")
        if grammar:
            if self._schemas is None:
                from ..constrain.json_schema import SchemaCompiler

                self._schemas = SchemaCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
            if params.json_schema is None:
                return self._schemas.pattern_constraint(end_ids, params.guided_regex, params.guided_choice)
            return self._schemas.constraint(params.json_schema, end_ids, params.json_prefix, params.json_suffix)
        return JsonObjectConstraint(self._token_text, end_ids, set(self.tokenizer.all_special_ids),
                                    params.json_prefix, params.json_suffix)

    def abort(self, request_id: str) -> bool:
        """Cancel a request: its blocks go back to the pool now."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if not req.seq.is_finished:
            self.scheduler.finish(req.seq, "abort")
        return True

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (a single-rank engine has none); the engine takes no more steps."""
        if self.followers is not None:
            followers, self.followers = self.followers, None
            self.runner.stop_followers()
            self.runner.leave_group()  # while the followers leave too: NCCL's teardown waits for every rank
            followers.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def start_profile(self, out_dir: str | Path, with_stack: bool = False) -> None:
        """Record torch.profiler traces of the coming steps on every tensor-parallel rank (vLLM's start_profile);
        ``with_stack``: Python calls too."""
        self.runner.profile(str(out_dir), with_stack)

    def stop_profile(self) -> str:
        """End the recording; every rank writes ``rank<r>.trace.json.gz`` (chrome://tracing, Perfetto) into the
        directory given to ``start_profile``, which is returned."""
        return str(self.runner.profile(None).parent)

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            following = self._launch_following(pending)
            outputs = self._complete(pending)
            self._pending = following
            return outputs
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        if self._can_defer(scheduled):
            rows = [seq for seq, _ in scheduled]
            try:
                self._pending = self._launch(rows)
            except Exception as e:  # keep serving: fail this step's requests, not the engine
                log.exception("step failed")
                return [self._finish(seq, "error", error=f"{type(e).__name__}: {e}") for seq in rows]
            return []
        batch = ForwardBatch([], [], [], [], [], [])
        sampled: list[Sequence] = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            score = seq.params.prompt_logprobs and start + 1 < seq.num_prompt_tokens
            batch.score_targets.append(seq.token_ids[start + 1:min(start + n + 1, seq.num_prompt_tokens)]
                                       if score else None)
            batch.score_topn.append(seq.params.prompt_top_logprobs if score else 0)
            batch.token_ids.append(seq.token_ids[start:start + n])
            batch.start_positions.append(start)
            batch.block_tables.append(seq.block_table)
            wants = start + n == len(seq)
            batch.sample.append(wants)
            if wants:
                sampled.append(seq)
        if not any(batch.score_targets):
            batch.score_targets = batch.score_topn = None
        try:
            result = self.runner.execute(batch, self._sampling_batch(sampled) if sampled else None)
        except Exception as e:  # keep serving: fail this step's requests, not the engine
            log.exception("step failed")
            return [self._finish(seq, "error", error=f"{type(e).__name__}: {e}") for seq, _ in scheduled]
        for row, (seq, n) in enumerate(scheduled):
            if result is not None and result.scores and row in result.scores:
                if seq.prompt_logprobs is None:
                    seq.prompt_logprobs = [None] * seq.num_prompt_tokens
                start = seq.num_computed_tokens + 1
                scores = result.scores[row]
                if scores and isinstance(scores[0], tuple):  # (logprob, top-n) pairs
                    if seq.prompt_top_logprobs is None:
                        seq.prompt_top_logprobs = [None] * seq.num_prompt_tokens
                    seq.prompt_top_logprobs[start:start + len(scores)] = [t for _, t in scores]
                    scores = [v for v, _ in scores]
                seq.prompt_logprobs[start:start + len(scores)] = scores
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)
        outputs = []
        for i, seq in enumerate(sampled):
            outputs.append(self._append(seq, result.token_ids[i], result.logprobs[i]))
        return [o for o in outputs if o is not None]

    # -- async scheduling --------------------------------------------------------------------------
    def _overlappable(self, seq: Sequence) -> bool:
        """Whether this sequence's next token can be sampled before the host has seen its last one."""
        p = seq.params
        return (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and p.logprobs is None and "constraint" not in self.requests[seq.request_id].extra)

    def _can_defer(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        """A plain decode step (one new token per running sequence, each sampled) can be left in flight."""
        return self.config.async_scheduling and all(
            n == 1 and seq.num_computed_tokens + 1 == len(seq) and self._overlappable(seq) for seq, n in scheduled)

    def _launch(self, rows: list[Sequence], feed: tuple[PendingTokens, list[int]] | None = None) -> _Pending:
        """Queue one decode step for ``rows``; with ``feed``, their input tokens are still on the device."""
        ahead = 0 if feed is None else 1  # tokens sampled but not yet appended
        batch = ForwardBatch(
            token_ids=[[0] if feed is not None else [seq.token_ids[-1]] for seq in rows],
            start_positions=[seq.num_computed_tokens for seq in rows],
            block_tables=[seq.block_table for seq in rows], sample=[True] * len(rows))
        tokens = self.runner.launch_decode(batch, self._sampling_batch(rows, ahead), feed)
        for seq in rows:
            seq.num_computed_tokens += 1
            if feed is None:
                self.block_manager.register_computed(seq)
        return _Pending(rows, tokens)

    def _launch_following(self, pending: _Pending) -> _Pending | None:
        """Queue the step after ``pending`` before its tokens are read, when nothing needs the host first."""
        sch, bm = self.scheduler, self.block_manager
        if sch.waiting and len(sch.running) < self.config.max_num_seqs:
            return None  # let the scheduler admit the waiting requests
        alive = [(i, seq) for i, seq in enumerate(pending.rows) if not seq.is_finished]
        if len(alive) != len(sch.running):
            return None  # someone runs who is not in this step (cannot happen today; the scheduler handles it)
        # a sequence whose pending token ends it by length gets no next step
        feed_rows = [i for i, seq in alive if len(seq) + 1 < seq.max_total_tokens]
        rows = [pending.rows[i] for i in feed_rows]
        if not rows:
            return None
        need = sum(max(0, bm.blocks_needed(seq.num_computed_tokens + 1) - len(seq.block_table)) for seq in rows)
        if need > bm.num_free_blocks:
            return None  # the scheduler decides who gets preempted
        for seq in rows:
            bm.ensure(seq, seq.num_computed_tokens + 1)
        try:
            return self._launch(rows, (pending.tokens, feed_rows))
        except Exception:  # the synchronous step that follows reports it
            log.exception("queueing the next decode step failed")
            return None

    def _complete(self, pending: _Pending) -> list[RequestOutput]:
        """Read a queued step's tokens and turn them into outputs; rows of finished sequences are dropped."""
        try:
            tokens = pending.tokens.wait()
        except Exception as e:
            log.exception("step failed")
            return [self._finish(seq, "error", error=f"{type(e).__name__}: {e}")
                    for seq in pending.rows if not seq.is_finished]
        outputs = []
        for seq, token in zip(pending.rows, tokens):
            if seq.is_finished:
                continue
            out = self._append(seq, token, None)
            if not seq.is_finished:
                self.block_manager.register_computed(seq)
            if out is not None:
                outputs.append(out)
        return outputs

    def _sampling_batch(self, seqs: list[Sequence], ahead: int = 0) -> SamplingBatch:
        """Per-row sampling settings; ``ahead``: tokens each row has sampled that are not yet appended."""
        ps = [s.params for s in seqs]
        forbidden = []
        for s in seqs:
            r = self.requests[s.request_id]
            forbidden.append(sorted(r.stop_ids | self.eos_ids)
                             if s.num_output_tokens + ahead < s.params.min_new_tokens else [])
        return SamplingBatch(
            temperatures=[p.temperature for p in ps], top_ps=[p.top_p for p in ps], top_ks=[p.top_k for p in ps],
            repetition_penalties=[p.repetition_penalty for p in ps], seeds=[p.random_seed for p in ps],
            steps=[s.num_output_tokens + ahead for s in seqs], num_logprobs=[p.logprobs for p in ps],
            histories=[s.token_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, ps)],
            forbidden=forbidden,
            presence_penalties=[p.presence_penalty for p in ps], frequency_penalties=[p.frequency_penalty for p in ps],
            outputs=[s.output_ids if (p.presence_penalty or p.frequency_penalty) else [] for s, p in zip(seqs, ps)],
            constraints=[self.requests[s.request_id].extra.get("constraint") for s in seqs],
            logit_biases=[p.logit_bias for p in ps])

    def _token_text(self, token_id: int) -> str:
        """A token's text alone (cached): what the JSON constraint checks a candidate with."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _append(self, seq: Sequence, token: int, logprobs) -> RequestOutput | None:
        req = self.requests[seq.request_id]
        seq.token_ids.append(token)
        if "constraint" in req.extra:
            req.extra["constraint"].advance(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        reason = None
        if token in req.stop_ids:
            reason = "stop"
        elif len(seq) >= seq.max_total_tokens:
            reason = "length"
        if req.detok is not None:
            ids = seq.output_ids[:-1] if reason == "stop" else seq.output_ids
            if req.detok.update(ids):
                reason = "stop"
        if reason is not None:
            return self._finish(seq, reason)
        if not req.stream:
            return None
        return self._output(req, final=False)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        req = self.requests.pop(seq.request_id)
        self.scheduler.finish(seq, reason)
        return self._output(req, final=True, error=error)

    def _output(self, req: _Request, final: bool, error: str | None = None) -> RequestOutput:
        seq = req.seq
        out_ids = seq.output_ids
        new = out_ids[req.sent_tokens:]
        req.sent_tokens = len(out_ids)
        text = delta = ""
        if self.tokenizer is not None:
            visible = out_ids[:-1] if seq.finish_reason == "stop" and out_ids and out_ids[-1] in req.stop_ids \
                else out_ids
            if req.detok is not None:
                if final and seq.finish_reason != "stop":
                    req.detok.flush(visible)
                text, delta = req.detok.text, req.detok.delta(final)
            elif final:
                text = delta = self.tokenizer.decode(visible, skip_special_tokens=seq.params.skip_special_tokens)
        return RequestOutput(
            request_id=seq.request_id, token_ids=list(out_ids), new_token_ids=new, text=text, delta_text=delta,
            finished=final, finish_reason=seq.finish_reason if final else None,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens, error=error,
            prompt_logprobs=seq.prompt_logprobs if final else None,
            prompt_top_logprobs=seq.prompt_top_logprobs if final else None)

    def get_ppl(self, input_ids: list[list[int]]) -> list[float]:
        """Mean negative log-likelihood of tokens 1..n of each sequence given the ones before (LMDeploy's
        ``get_ppl``); exponentiate for perplexity. Sequences run as one batch, chunked like any prefill."""
        g = GenerationConfig(max_new_tokens=1, prompt_logprobs=True, ignore_eos=True)
        outs = self.generate([list(ids) for ids in input_ids], g)
        return [-sum(o.prompt_logprobs[1:]) / (len(o.prompt_logprobs) - 1) for o in outs]

    # -- convenience -------------------------------------------------------------------------------
    def stream(self, prompts: list, params: GenerationConfig | list[GenerationConfig] | None = None,
               request_ids: list[str] | None = None) -> Iterator[list[tuple[int, RequestOutput]]]:
        """Run prompts as one continuous batch, yielding each step's new outputs as ``(prompt index, output)``
        pairs until all finish (or are aborted: ``request_ids``, else generated). Closing the iterator early
        aborts what still runs."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = request_ids or [None] * len(prompts)
        index = {self.add_request(p, g, rid, stream=True): i
                 for i, (p, g, rid) in enumerate(zip(prompts, plist, rids))}
        live = set(index)
        try:
            while live:
                outs = [o for o in self.step() if o.request_id in live]
                live.intersection_update(self.requests)  # finished, or aborted meanwhile
                if outs:
                    yield [(index[o.request_id], o) for o in outs]
        finally:
            for rid in live:
                self.abort(rid)

    def generate(self, prompts: list, params: GenerationConfig | list[GenerationConfig] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion as one continuous batch; outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        rids = [self.add_request(p, g) for p, g in zip(prompts, plist)]
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rids), desc="Generating")
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [done[r] for r in rids]
