"""What a block worker's cold start costs, step by step, in fresh Python processes (1 alone, then N at once).

The distributed quantizer's block workers start cold in every job; on 4 H100s they were ready ~16-20 s after
the job asked for them, a fixed cost that caps the 7B job's 4-GPU speedup. This separates the steps that do
not involve Ray: ``import torch``, the CUDA context, the block worker's own module (what
``cluster.block_task.warm_worker`` pays now), and, for comparison, ``import transformers`` with the meta-device
model skeleton of the Llama-2-7B shape that workers built before blocks became ``quant.decoder`` modules.

    python benchmarks/worker_start.py [--procs 4]     # from the repository root
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, time
t0 = time.perf_counter(); steps = {}
import torch
steps["import torch"] = time.perf_counter() - t0; t = time.perf_counter()
if torch.cuda.is_available():
    torch.cuda.set_device(DEVICE % torch.cuda.device_count()); torch.empty(1, device="cuda")
steps["CUDA context"] = time.perf_counter() - t; t = time.perf_counter()
import cluster.block_task
steps["import cluster.block_task (worker)"] = time.perf_counter() - t; t = time.perf_counter()
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig
steps["import transformers"] = time.perf_counter() - t; t = time.perf_counter()
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
steps["7B skeleton on meta (first)"] = time.perf_counter() - t; t = time.perf_counter()
with torch.device("meta"):
    AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
steps["7B skeleton on meta (again)"] = time.perf_counter() - t
steps["total"] = time.perf_counter() - t0
print(json.dumps(steps))
"""


def run(procs: int) -> list[dict[str, float]]:
    children = [subprocess.Popen([sys.executable, "-c", CHILD.replace("DEVICE", str(i))], stdout=subprocess.PIPE,
                                 text=True) for i in range(procs)]
    outs = [c.communicate()[0] for c in children]
    failed = [i for i, c in enumerate(children) if c.returncode != 0]
    if failed:
        raise SystemExit(f"worker-start probe process(es) {failed} failed (their stderr is above)")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=4, help="processes started at once in the second round")
    args = ap.parse_args()
    for n in (1, args.procs):
        rows = run(n)
        print(f"{n} process(es) at once, slowest per step (s):")
        for step in rows[0]:
            print(f"  {step:<36s} {max(r[step] for r in rows):6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
