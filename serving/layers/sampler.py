"""From logits to next tokens: logit bias, repetition, presence and frequency penalties, temperature, top-k, top-p,
seeded sampling, logprobs.

Works on a batch; the per-row settings come as plain lists (the sampler knows nothing of requests).
A seeded row draws its noise from a generator seeded with (seed, step), so a request with a seed gives the
same tokens whatever it is batched with, and again after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingBatch:
    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]
    repetition_penalties: list[float]
    seeds: list[int | None]
    steps: list[int]                          # output tokens so far (seeds advance with it)
    num_logprobs: list[int | None]
    histories: list[list[int]] = field(default_factory=list)  # tokens penalised, only where penalty != 1
    forbidden: list[list[int]] = field(default_factory=list)  # tokens that may not be sampled (min_new_tokens)
    presence_penalties: list[float] = field(default_factory=list)   # OpenAI's additive penalties, over the
    frequency_penalties: list[float] = field(default_factory=list)  # output tokens only (empty: none)
    outputs: list[list[int]] = field(default_factory=list)  # output tokens, only where an additive penalty is set
    constraints: list = field(default_factory=list)  # per row None or an object with allows(token_id) -> bool
    logit_biases: list[dict[int, float]] = field(default_factory=list)  # per row token id -> bias (empty: none)

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 or k == 1 for t, k in zip(self.temperatures, self.top_ks))


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]   # chosen token first, then the top-n
    scores: dict[int, list[float]] | None = None  # batch row -> prompt-token logprobs computed this step


def _on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor of per-row settings on ``device`` without a blocking copy (a blocking host-to-device copy
    waits for the whole stream, which would stall a step queued behind the one being sampled)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class Sampler:
    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SampleOutput:
        logits = logits.float()
        want_lp = any(n is not None for n in b.num_logprobs)
        raw_lp = torch.log_softmax(logits, dim=-1) if want_lp else None
        scores = self._scores(logits, b)
        token_list = scores.argmax(dim=-1).tolist()
        if any(b.constraints):
            token_list = self._constrain(scores, token_list, b.constraints)
        return SampleOutput(token_list, self._logprobs(raw_lp, token_list, b) if want_lp else [None] * len(token_list))

    def sample(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """The chosen token ids as a device tensor, queued without a host sync (no constraints, no logprobs)."""
        if any(b.constraints):
            raise ValueError("constrained rows need the host: sample them with Sampler.__call__")
        return self._scores(logits.float(), b).argmax(dim=-1)

    def _scores(self, logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """Per row, the token with the highest score is the choice: the (penalised) logits for greedy rows, and
        for sampled rows probs / Exp(1) noise (an exponential race, so the best-ranked token is a draw from the
        row's distribution, and the best-ranked *allowed* token a draw from it restricted to the allowed ones)."""
        logits = self._penalise(logits, b)
        return logits if b.all_greedy else self._sample_scores(logits, b)

    @staticmethod
    def _penalise(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        """OpenAI's logit bias (added first, as in vLLM, so the penalties see the biased logits), the additive
        penalties, HF repetition penalty on every token seen (prompt and output); forbidden tokens to -inf."""
        rows = [i for i, p in enumerate(b.repetition_penalties) if p != 1.0 and b.histories and b.histories[i]]
        forbid = [i for i, f in enumerate(b.forbidden) if f]
        additive = [i for i, out in enumerate(b.outputs) if out]
        biased = [i for i, d in enumerate(b.logit_biases) if d]
        if not rows and not forbid and not additive and not biased:
            return logits
        dev = logits.device
        logits = logits.clone()
        if biased:
            r_idx = _on(dev, [i for i in biased for _ in b.logit_biases[i]])
            t_idx = _on(dev, [t for i in biased for t in b.logit_biases[i]])
            vals = _on(dev, [float(v) for i in biased for v in b.logit_biases[i].values()], logits.dtype)
            logits.index_put_((r_idx, t_idx), vals, accumulate=True)
        if additive:  # logit -= frequency * count + presence * (count > 0), as OpenAI defines them
            r_idx = _on(dev, [i for i in additive for _ in b.outputs[i]])
            t_idx = _on(dev, [t for i in additive for t in b.outputs[i]])
            counts = torch.zeros_like(logits)
            counts.index_put_((r_idx, t_idx), torch.ones(len(r_idx), device=dev), accumulate=True)
            freq = _on(dev, b.frequency_penalties, logits.dtype)[:, None]
            pres = _on(dev, b.presence_penalties, logits.dtype)[:, None]
            logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
        if rows:
            r_idx = [i for i in rows for _ in b.histories[i]]
            t_idx = [t for i in rows for t in b.histories[i]]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[_on(dev, r_idx), _on(dev, t_idx)] = True
            p = _on(dev, b.repetition_penalties, logits.dtype)[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
        if forbid:
            r_idx = [i for i in forbid for _ in b.forbidden[i]]
            t_idx = [t for i in forbid for t in b.forbidden[i]]
            logits[_on(dev, r_idx), _on(dev, t_idx)] = float("-inf")
        return logits

    @staticmethod
    def _constrain(scores: torch.Tensor, tokens: list[int], constraints: list, first: int = 64) -> list[int]:
        """Replace each constrained row's choice by its best-ranked allowed token (through the constraint's
        ``token_mask`` where it has one: a grammar's bitmask)."""
        out = list(tokens)
        for i, c in enumerate(constraints):
            if c is None or c.allows(out[i]):
                continue
            row = scores[i]
            if hasattr(c, "token_mask"):
                mask = c.token_mask(row.numel(), row.device)
                if bool(mask.any()):
                    out[i] = int(torch.where(mask, row, float("-inf")).argmax())
                continue
            ranked = row.topk(min(first, row.numel())).indices.tolist()
            pick = next((t for t in ranked if c.allows(t)), None)
            if pick is None:  # rare: scan the whole vocabulary in rank order
                pick = next((t for t in row.argsort(descending=True).tolist() if c.allows(t)), out[i])
            out[i] = pick
        return out

    @staticmethod
    def _sample_scores(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
        dev = logits.device
        greedy = _on(dev, [t == 0.0 or k == 1 for t, k in zip(b.temperatures, b.top_ks)])
        temps = _on(dev, [t if t > 0 else 1.0 for t in b.temperatures])
        x = logits / temps[:, None]
        vocab = x.shape[-1]
        ks = [k if 0 < k < vocab else 0 for k in b.top_ks]
        if any(ks):
            kmax = max(ks)
            kth = x.topk(kmax, dim=-1).values  # [B, kmax], descending
            idx = _on(dev, [max(k, 1) - 1 if k else kmax - 1 for k in ks])
            thresh = kth.gather(1, idx[:, None])
            use = _on(dev, [k > 0 for k in ks])
            x = torch.where(use[:, None] & (x < thresh), float("-inf"), x)
        if any(p < 1.0 for p in b.top_ps):
            ps = _on(dev, b.top_ps)
            sorted_x, order = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
            drop = before > ps[:, None]
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)
        probs = x.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, seed in enumerate(b.seeds):
            if seed is not None:
                g = torch.Generator(device=dev).manual_seed((int(seed) * 1_000_003 + b.steps[i]) % (2**63))
                noise[i].exponential_(generator=g)
        return torch.where(greedy[:, None], logits, probs / noise)

    @staticmethod
    def _logprobs(raw_lp: torch.Tensor, tokens: list[int], b: SamplingBatch) -> list:
        out: list = []
        n_max = max((n or 0) for n in b.num_logprobs)
        top = raw_lp.topk(n_max, dim=-1) if n_max else None
        chosen = raw_lp.gather(1, torch.tensor(tokens, device=raw_lp.device)[:, None]).squeeze(1).tolist()
        top_v = top.values.tolist() if top is not None else None
        top_i = top.indices.tolist() if top is not None else None
        for i, n in enumerate(b.num_logprobs):
            if n is None:
                out.append(None)
                continue
            d = {tokens[i]: chosen[i]}
            for j in range(n):
                d.setdefault(top_i[i][j], top_v[i][j])
            out.append(d)
        return out
