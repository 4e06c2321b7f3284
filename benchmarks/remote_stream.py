"""What streaming through ``RemoteEngine`` costs: ``pipeline(tp=N)`` decoding one request whole (one actor call)
against streaming it (``stream_infer``: one Ray streaming-generator call), side by side in one run.

    python benchmarks/remote_stream.py --out DIR [--tp 2]     # on N GPUs: DIR/remote_stream.json
    python benchmarks/remote_stream.py --small --device cpu   # a tiny config over gloo, to check the script

The checkpoint is ``benchmarks/tp.py``'s random Llama-3-8B-shaped AWQ one. Batch 1, 128-token prompt,
``--new-tokens`` tokens (``ignore_eos``); tokens/s after the first token, best of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine import prompt_ids  # noqa: E402
from benchmarks.tp import checkpoint_and_ray  # noqa: E402


def measure(args) -> dict:
    import ray
    import torch

    from serving import EngineConfig, GenerationConfig
    from serving.pipeline import pipeline

    c, path, n_gpu = checkpoint_and_ray(args)
    cfg = EngineConfig(dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
                       session_len=4096, max_num_seqs=8, enable_prefix_caching=False, cache_max_entry_count=0.3,
                       progress=False, tp=args.tp)
    g = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompt = prompt_ids(1, 128, c["vocab_size"], 3)[0]
    res = {"device": torch.cuda.get_device_name(0) if n_gpu else "cpu", "tp": args.tp,
           "new_tokens": args.new_tokens, "commit": os.environ.get("RAYAWQ_COMMIT"), "whole": [], "stream": []}
    with pipeline(str(path), cfg) as pipe:
        pipe(prompt, g, do_preprocess=False)  # warm-up
        for _ in range(args.runs):
            t = time.perf_counter()
            out = pipe(prompt, GenerationConfig(max_new_tokens=1, ignore_eos=True), do_preprocess=False)
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = pipe(prompt, g, do_preprocess=False)
            wall = time.perf_counter() - t
            res["whole"].append((out.generate_token_len - 1) / max(wall - first, 1e-9))
            stamps = [(time.perf_counter(), len(piece.token_ids))
                      for piece in pipe.stream_infer(prompt, g, do_preprocess=False) if piece.token_ids]
            n = sum(k for _, k in stamps) - stamps[0][1]  # the tokens after the first piece's
            res["stream"].append(n / max(stamps[-1][0] - stamps[0][0], 1e-9))
            res.setdefault("stream_pieces", []).append(len(stamps))
    ray.shutdown()
    res["whole_tok_s"], res["stream_tok_s"] = max(res["whole"]), max(res["stream"])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--small", action="store_true")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    res = measure(args)
    print(json.dumps(res), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "remote_stream.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
