"""Tensors only: builds the model for one rank, owns the KV cache and the CUDA graphs, runs a step.

A step arrives as a ``ForwardBatch`` of plain lists (tokens to compute per sequence, their first position,
block tables, which rows want a next token); the runner knows nothing of requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..config import EngineConfig, ModelConfig
from ..layers.context import AttentionContext, set_context
from ..layers.parallel import SINGLE, TPContext
from ..layers.sampler import SampleOutput, SamplingBatch, Sampler
from ..loader import iter_checkpoint, load_weights
from ..models import build_model
from .profiler import StepProfiler

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class ForwardBatch:
    token_ids: list[list[int]]     # tokens whose K/V are computed this step, per sequence
    start_positions: list[int]     # position of each sequence's first such token
    block_tables: list[list[int]]
    sample: list[bool]             # rows that want a next token (logits at their last token)
    score_targets: list[list[int]] | None = None  # per row: next-token ids to score (prompt logprobs)
    score_topn: list[int] | None = None  # per row: how many top alternatives to report with each score

    @property
    def is_decode(self) -> bool:
        return all(len(t) == 1 for t in self.token_ids)


@dataclass
class PendingTokens:
    """A decode step's sampled tokens before the host has read them.

    ``tokens`` stays on the device, so the next step can take its inputs from it while this one still runs
    (async scheduling); ``host`` is a pinned copy that is complete once ``event`` has fired.
    """

    tokens: torch.Tensor                 # [rows] int64, on the model's device
    host: torch.Tensor                   # [rows] int64, pinned (CUDA) or the same tensor (CPU)
    event: torch.cuda.Event | None = None

    def wait(self) -> list[int]:
        """The token ids, waiting for this step only (not for steps launched after it)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, model_path=None,
                 weights: Iterable[tuple[str, torch.Tensor]] | None = None, tp: TPContext = SINGLE,
                 device: str | torch.device | None = None):
        self.cfg, self.ecfg, self.tp = model_cfg, engine_cfg, tp
        dev = device or engine_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.block_size = engine_cfg.block_size
        if tp.world_size > 1 and self.device.type == "cuda" and engine_cfg.tp_symmetric_memory:
            rows = min(max(engine_cfg.max_num_seqs, 16), 512)  # decode batches (and prefill chunks that small)
            self.tp = tp = tp.with_symmetric_memory(self.device, rows * model_cfg.hidden_size * 4)
        with torch.device(self.device):
            self.model = build_model(model_cfg, tp).eval()
        if weights is None:
            weights = iter_checkpoint(model_path, progress=engine_cfg.progress and tp.rank == 0)
        load_weights(self.model, weights)
        if self.device.type == "cuda" and engine_cfg.repack_weights and model_cfg.quant is not None:
            self._repack_weights()
        self.sampler = Sampler()
        self.profiler = StepProfiler(tp.rank)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        # (by storage: a tied head that is a slice of the embedding is not counted twice)
        self.weight_bytes = sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                                 for p in self.model.parameters()}.values())
        self.num_blocks = self._allocate_kv_cache()
        self.max_model_len = min(engine_cfg.session_len or model_cfg.max_position_embeddings,
                                 model_cfg.max_position_embeddings, self.num_blocks * self.block_size)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if model_cfg.quant is not None and self.device.type == "cuda" and model_cfg.dtype == torch.float32:
            raise ValueError("AWQ models run in float16 or bfloat16 on GPU (dtype float32 is for CPU)")
        self._check_forward()
        if self.device.type == "cuda" and not engine_cfg.enforce_eager:
            try:
                self._capture_graphs()
            except Exception as e:  # a kernel that cannot be captured: serve eagerly rather than not at all
                log.warning("CUDA graph capture failed (%s); decoding eagerly", e)
                self.graphs = {}
                torch.cuda.synchronize()

    # -- KV cache ----------------------------------------------------------------------------------
    def _kv_block_bytes(self) -> int:
        attn = self.model.model.layers[0].self_attn
        elem = torch.empty(0, dtype=self.cfg.dtype).element_size()
        return 2 * self.cfg.num_layers * self.block_size * attn.num_kv_heads * attn.head_dim * elem

    def _allocate_kv_cache(self) -> int:
        per_block = self._kv_block_bytes()
        if self.ecfg.num_kv_blocks:
            n = self.ecfg.num_kv_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            n = int(free * self.ecfg.cache_max_entry_count) // per_block
        else:
            want = self.ecfg.max_num_seqs * (self.ecfg.session_len or self.cfg.max_position_embeddings)
            n = min(-(-want // self.block_size), CPU_KV_CACHE_BYTES // per_block)
        n = self.tp.min_int(n)  # rank 0 schedules blocks that every rank must hold
        if n < 1:
            raise RuntimeError("no memory left for the KV cache after the weights")
        attn0 = self.model.model.layers[0].self_attn
        shape = (2, self.cfg.num_layers, n, self.block_size, attn0.num_kv_heads, attn0.head_dim)
        self.kv_cache = torch.empty(shape, dtype=self.cfg.dtype, device=self.device)
        if self.device.type == "cpu":
            self.kv_cache.zero_()
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.attn.v_cache = self.kv_cache[1, i]
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", n, self.block_size, n * per_block / 2**30)
        return n

    @torch.inference_mode()
    def _check_forward(self) -> None:
        """One token through the model now, so that a layer the kernels cannot run fails at load, not later."""
        t = lambda v, dt=torch.int32: torch.tensor(v, dtype=dt, device=self.device)  # noqa: E731
        set_context(AttentionContext(t([-1], torch.int64), t([0, 1]), t([1]), t([[0]]), 1, [0, 1], [1]))
        try:
            self.model.compute_logits(self.model(t([0], torch.int64), t([0], torch.int64)))
        finally:
            set_context(None)

    # -- one step ----------------------------------------------------------------------------------
    def _tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        pin = self.device.type == "cuda"
        t = torch.tensor(data, dtype=dtype, pin_memory=pin)
        return t.to(self.device, non_blocking=True) if pin else t

    def _prepare(self, b: ForwardBatch):
        bs = self.block_size
        ids, pos, slots, cu, kv_lens, last = [], [], [], [0], [], []
        for toks, start, table in zip(b.token_ids, b.start_positions, b.block_tables):
            n = len(toks)
            ids.extend(toks)
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            cu.append(cu[-1] + n)
            kv_lens.append(start + n)
            last.append(cu[-1] - 1)
        width = max(len(t) for t in b.block_tables)
        tables = [t + [0] * (width - len(t)) for t in b.block_tables]
        return ids, pos, slots, cu, kv_lens, tables, [i for i, s in zip(last, b.sample) if s]

    def _forward(self, b: ForwardBatch, fed: torch.Tensor | None = None):
        """Hidden states of the step's tokens (a decode batch through its CUDA graph when one fits, else eagerly);
        ``fed``: input ids already on the device. Returns ``(hidden, cu_seqlens, rows whose logits are wanted)``."""
        ids, pos, slots, cu, kv_lens, tables, logit_rows = self._prepare(b)
        graph_bs = next((g for g in sorted(self.graphs) if g >= len(b.token_ids)), None) if b.is_decode else None
        if graph_bs is not None:
            return self._replay(graph_bs, ids, pos, slots, kv_lens, tables, fed), cu, logit_rows
        ctx = AttentionContext(
            slot_mapping=self._tensor(slots, torch.int64), cu_seqlens_q=self._tensor(cu),
            kv_lens=self._tensor(kv_lens), block_tables=self._tensor(tables),
            max_q_len=max(len(t) for t in b.token_ids), cpu_cu_seqlens_q=cu, cpu_kv_lens=kv_lens)
        set_context(ctx)
        try:
            hidden = self.model(fed if fed is not None else self._tensor(ids, torch.int64),
                                self._tensor(pos, torch.int64))
        finally:
            set_context(None)
        return hidden, cu, logit_rows

    @torch.inference_mode()
    def execute(self, b: ForwardBatch, sampling: SamplingBatch | None) -> SampleOutput | None:
        if self.tp.is_leader:
            self.tp.broadcast_object(("execute", b))
        hidden, cu, logit_rows = self._forward(b)
        if self.tp.rank > 0 and not self.model.logits_are_collective:
            return None  # followers only fill their KV shards; rank 0 holds the logits
        # (a vocabulary-parallel head: followers compute their share of the same logits, rank 0 uses them)
        scores = self._score(hidden, cu, b.score_targets, b.score_topn) if b.score_targets else None
        if not logit_rows:
            return SampleOutput([], [], scores) if scores and self.tp.rank == 0 else None
        rows = self._tensor(logit_rows, torch.int64)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        if self.tp.rank > 0:
            return None
        out = self.sampler(logits, sampling)
        out.scores = scores
        return out

    @torch.inference_mode()
    def launch_decode(self, b: ForwardBatch, sampling: SamplingBatch | None,
                      feed: tuple[PendingTokens, list[int]] | None = None) -> PendingTokens:
        """Queue a decode step (every row samples) and return without waiting for its tokens.

        With ``feed = (previous, rows)``, row ``i``'s input token is ``previous.tokens[rows[i]]``, read on the
        device: the step can be queued before the host has seen the previous step's tokens. Sampling must
        not need the host (no constraints, no logprobs): the engine keeps such requests on ``execute``.
        """
        n = len(b.token_ids)
        if self.tp.is_leader:
            self.tp.broadcast_object(("decode", b, None if feed is None else feed[1]))
        fed = None
        if feed is not None:
            prev, rows = feed
            fed = prev.tokens if rows == list(range(prev.tokens.shape[0])) else \
                prev.tokens.index_select(0, self._tensor(rows, torch.int64))
        hidden, _, _ = self._forward(b, fed)
        if self.tp.rank > 0:  # rank 0's tokens: the next step may take its inputs from them on the device
            if self.model.logits_are_collective:
                self.model.compute_logits(hidden)
            tokens = self.tp.broadcast(torch.empty(n, dtype=torch.int64, device=self.device))
            return PendingTokens(tokens, tokens)
        tokens = self.tp.broadcast(self.sampler.sample(self.model.compute_logits(hidden), sampling))
        if self.device.type != "cuda":
            return PendingTokens(tokens, tokens)
        host = torch.empty(n, dtype=torch.int64, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingTokens(tokens, host, event)

    # -- tensor parallelism: ranks > 0 follow rank 0's steps ----------------------------------------
    def follow(self) -> None:
        """Run the steps rank 0 sends (their collectives pair up with rank 0's) until it sends ``stop``."""
        last: PendingTokens | None = None
        while True:
            msg = self.tp.broadcast_object()
            if msg[0] == "stop":
                return
            if msg[0] == "profile":
                self.profile(*msg[1:])
                continue
            if msg[0] == "execute":
                self.execute(msg[1], None)
            elif msg[0] == "decode":
                _, b, rows = msg
                if rows is not None and last is None:
                    raise RuntimeError("rank 0 fed a decode step from tokens this rank never received")
                last = self.launch_decode(b, None, None if rows is None else (last, rows))
            else:
                raise RuntimeError(f"unknown step {msg[0]!r} from rank 0")

    def profile(self, out_dir: str | None, with_stack: bool = False) -> Path | None:
        """Start (``out_dir``) or stop (None) this rank's torch.profiler trace; rank 0 tells the followers too.
        Stopping returns the path of this rank's trace."""
        if self.tp.is_leader:
            self.tp.broadcast_object(("profile", out_dir, with_stack))
        if out_dir is not None:
            self.profiler.start(out_dir, with_stack)
            return None
        return self.profiler.stop()

    def stop_followers(self, timeout_s: float = 10.0) -> None:
        """Rank 0: let the other ranks' ``follow`` return (a rank that died is left to its actor's end)."""
        if self.tp.is_leader:
            try:
                self.tp.broadcast_object(("stop",), timeout_s)
            except Exception as e:
                log.warning("could not tell every tensor-parallel rank to stop: %s", e)

    def leave_group(self) -> None:
        """Every rank, after ``stop``: drop the graphs (their kernels hold the group's communicators), leave."""
        if self.tp.world_size > 1:
            self.graphs.clear()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.tp.destroy()

    def _score(self, hidden, cu, targets, topn: list[int] | None = None, chunk: int = 1024) -> dict[int, list]:
        """Log-probability of each given next token, from the hidden state of the token before it.

        Per row a list of floats, or, where ``topn[row] > 0``, of ``(logprob, {token: logprob} top n)``.
        """
        rows, ids, owners = [], [], []
        for i, tg in enumerate(targets):
            if tg:
                rows.extend(range(cu[i], cu[i] + len(tg)))
                ids.extend(tg)
                owners.append((i, len(tg)))
        k = max(topn or [0])
        vals: list[float] = []
        tops: list = []
        for s in range(0, len(rows), chunk):
            r = self._tensor(rows[s:s + chunk], torch.int64)
            logits = self.model.compute_logits(hidden.index_select(0, r))
            if self.tp.rank > 0:  # a follower's share of a vocabulary-parallel head: rank 0 scores
                continue
            t = self._tensor(ids[s:s + chunk], torch.int64)
            lp = torch.log_softmax(logits.float(), dim=-1)
            vals.extend(lp.gather(1, t[:, None]).squeeze(1).tolist())
            if k:
                top = lp.topk(k, dim=-1)
                tops.extend(zip(top.indices.tolist(), top.values.tolist()))
        out, pos = {}, 0
        for i, n in owners:
            want = topn[i] if topn else 0
            if want:
                out[i] = [(v, dict(zip(ti[:want], tv[:want]))) for v, (ti, tv) in zip(vals[pos:pos + n],
                                                                                     tops[pos:pos + n])]
            else:
                out[i] = vals[pos:pos + n]
            pos += n
        return out

    # -- CUDA graphs (decode) ----------------------------------------------------------------------
    def _graph_sizes(self) -> list[int]:
        top = min(self.ecfg.cuda_graph_max_bs or self.ecfg.max_num_seqs, self.ecfg.max_num_seqs, 512)
        sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
        return sorted(set(sizes + [top]))

    def _capture_graphs(self) -> None:
        sizes = self._graph_sizes()
        m, dev = max(sizes), self.device
        self.g_ids = torch.zeros(m, dtype=torch.int64, device=dev)
        self.g_pos = torch.zeros(m, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((m,), -1, dtype=torch.int64, device=dev)
        self.g_kv = torch.zeros(m, dtype=torch.int32, device=dev)
        self.g_cu = torch.arange(m + 1, dtype=torch.int32, device=dev)
        self.g_tables = torch.zeros(m, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        # Two sets, used in turn: with async scheduling the host fills one step's mirrors while the previous
        # step's copies may not have run yet; each set's event says when its copies are done.
        self.mirrors = [_Mirrors(m, self.max_blocks_per_seq) for _ in range(2)]
        self._mirror_turn = 0
        self._warmup_kernels(sizes)
        pool = None
        for bs in reversed(sizes):
            set_context(AttentionContext(self.g_slots[:bs], self.g_cu[:bs + 1], self.g_kv[:bs],
                                         self.g_tables[:bs], max_q_len=1))
            self.model(self.g_ids[:bs], self.g_pos[:bs])  # warm-up: compiles and tunes kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                out = self.model(self.g_ids[:bs], self.g_pos[:bs])
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = (graph, out)
        set_context(None)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", sizes)

    def _repack_weights(self) -> None:
        """AWQ linears into the fragment-repacked layout where kernels/ runs it faster (one copy: the AutoAWQ
        words are freed); the others keep the AutoAWQ layout."""
        from ..layers.linear import Linear

        linears = [m for m in self.model.modules() if isinstance(m, Linear) and m.quant is not None]
        done = sum(m.repack_weights() for m in linears)
        if done:
            log.info("repacked %d of %d AWQ linears into the tensor cores' fragment order", done, len(linears))

    def _warmup_kernels(self, sizes: list[int]) -> None:
        """Let kernels/ pick and compile its W4A16 configs (and make its workspaces) before any capture."""
        q = self.cfg.quant
        if q is None:
            return
        import kernels

        if not hasattr(kernels, "warmup"):
            return
        from ..layers.linear import Linear

        shapes = sorted({(m.in_local, m.out_local) for m in self.model.modules()
                         if isinstance(m, Linear) and m.quant is not None and m.qweight.dim() == 2})
        kernels.warmup(shapes, group_size=q.group_size, dtype=self.cfg.dtype, device=self.device, m_values=sizes,
                       tune=self.ecfg.tune_kernels)
        # repacked linears: every config their dispatcher picks up to a full prefill chunk, compiled now
        repacked = sorted({(m.in_local, m.out_local) for m in self.model.modules()
                           if isinstance(m, Linear) and m.quant is not None and m.qweight.dim() == 4})
        if repacked:
            kernels.repacked_dispatch.warmup(repacked, q.group_size, self.device,
                                             max_rows=self.ecfg.max_num_batched_tokens, dtype=self.cfg.dtype)

    def _replay(self, graph_bs, ids, pos, slots, kv_lens, tables, fed: torch.Tensor | None = None) -> torch.Tensor:
        """Write the step's inputs into pinned mirrors, copy them to the graph's inputs, replay.

        ``fed``: the input token ids already on the device (async scheduling), copied over ``ids``."""
        n = len(ids)
        b = graph_bs
        mirror = self.mirrors[self._mirror_turn]
        self._mirror_turn ^= 1
        mirror.copied.synchronize()  # its copies of two steps ago (long done): safe to overwrite
        h = mirror.i64.numpy()
        h[0, :n], h[1, :n], h[2, :n] = ids, pos, slots
        h[0, n:b], h[1, n:b], h[2, n:b] = 0, 0, -1  # padding rows: no cache slot written
        kv = mirror.kv.numpy()
        kv[:n], kv[n:b] = kv_lens, 0
        width = len(tables[0])
        mirror.tables.numpy()[:n, :width] = tables
        self.g_ids[:b].copy_(mirror.i64[0, :b], non_blocking=True)
        self.g_pos[:b].copy_(mirror.i64[1, :b], non_blocking=True)
        self.g_slots[:b].copy_(mirror.i64[2, :b], non_blocking=True)
        self.g_kv[:b].copy_(mirror.kv[:b], non_blocking=True)
        self.g_tables[:n, :width].copy_(mirror.tables[:n, :width], non_blocking=True)
        mirror.copied.record()
        if fed is not None:
            self.g_ids[:n].copy_(fed)
        graph, out = self.graphs[graph_bs]
        graph.replay()
        return out[:n]


class _Mirrors:
    """Pinned host copies of the decode graph's inputs, written through numpy views: a step copies them over
    with one asynchronous copy each (no tensors built from lists, no allocations)."""

    def __init__(self, rows: int, max_blocks: int):
        self.i64 = torch.zeros(3, rows, dtype=torch.int64, pin_memory=True)   # ids, positions, slots
        self.kv = torch.zeros(rows, dtype=torch.int32, pin_memory=True)
        self.tables = torch.zeros(rows, max_blocks, dtype=torch.int32, pin_memory=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
