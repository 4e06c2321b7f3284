"""``rayawq eval``: WikiText-style perplexity of an FP model or an AWQ checkpoint.

Two backends compute the same number (per-window mean NLL, averaged, exponentiated): the serving engine
(``engine``, the default: paged KV cache and the Triton kernels on GPU) and transformers with the reference
AWQ loader (``reference``).
"""

from __future__ import annotations

import argparse
import math


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from quant.evaluate import eval_windows, load_for_eval, perplexity
    from quant.pipeline import pick_device

    if args.tp > 1 and args.backend != "engine":
        raise SystemExit(f"--tp {args.tp} splits the serving engine over GPUs; the reference backend runs on one "
                         "(use --backend engine or drop --tp)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.backend == "engine":
        from serving.config import EngineConfig
        from serving.pipeline import pipeline

        windows = eval_windows(tokenizer, args.dataset, args.seqlen, args.max_windows)
        device = str(pick_device(args.device))
        cfg = EngineConfig(dtype=args.dtype, device=device, session_len=args.seqlen + 1, max_num_seqs=8,
                           enable_prefix_caching=False, tp=args.tp)
        with pipeline(args.model, cfg) as pipe:
            nlls = pipe.get_ppl(windows.tolist())
        ppl, n = math.exp(sum(nlls) / len(nlls)), len(nlls)
    else:
        dtype = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        model = load_for_eval(args.model, pick_device(args.device), dtype[args.dtype])
        res = perplexity(model, tokenizer, args.dataset, args.seqlen, args.max_windows)
        ppl, n = res.ppl, res.windows
    print(f"perplexity {ppl:.4f}  ({n} windows of {args.seqlen} tokens, {args.dataset}, {args.backend})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="WikiText-style perplexity of a model or AWQ checkpoint")
    e.add_argument("model", help="FP model directory or AWQ checkpoint")
    e.add_argument("--dataset", default="builtin", help="text file (.txt/.raw/.jsonl/.parquet) or builtin")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    e.add_argument("--tp", type=int, default=1, help="engine backend: tensor-parallel ranks (GPUs) on Ray")
    e.add_argument("--backend", default="engine", choices=["engine", "reference"],
                   help="engine: the serving engine; reference: transformers + the reference AWQ loader")
    e.set_defaults(func=cmd_eval)
