"""``rayawq serve MODEL``: start (or join) a Ray cluster and run the OpenAI-compatible Serve app on it.

    rayawq serve ./smollm2-awq --port 8000
    rayawq serve ./llama3-8b-awq --max-batch-size 64 --autoscale 1,4 --api-keys "$KEY"
    rayawq serve ./model --ray-address auto       # join the cluster this machine belongs to

It blocks until Ctrl-C, then deletes the app (and stops Ray if it started it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API on Ray Serve")
    s.add_argument("model", help="model directory: an AWQ checkpoint or an FP16/BF16 HF model")
    s.add_argument("--name", default=None, help="served model name (default: the directory's name)")
    s.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks per replica: GPUs of one node (NCCL); on CPU, processes (gloo)")
    s.add_argument("--model-format", default="auto", choices=["auto", "awq", "hf"])
    s.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda where the cluster has GPUs)")
    s.add_argument("--max-batch-size", type=int, default=None, help="sequences decoded together (default 128)")
    s.add_argument("--session-len", type=int, default=None, help="max tokens of one sequence (default: model's)")
    s.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="fraction of free GPU memory for the KV cache (default 0.8)")
    s.add_argument("--api-keys", nargs="*", default=None,
                   help="accepted keys (space or comma separated; also $RAYAWQ_API_KEYS); none: no auth")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    rep = s.add_mutually_exclusive_group()
    rep.add_argument("--num-replicas", type=int, default=1, help="engine replicas (fixed)")
    rep.add_argument("--autoscale", default=None, metavar="MIN,MAX",
                     help="autoscale engine replicas between MIN and MAX on ongoing requests")
    s.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="with --autoscale: requests per replica to aim for (default max-batch-size / 2)")
    s.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per engine replica")
    s.add_argument("--chat-template", default=None,
                   help="Jinja chat template, or a file holding one, replacing the tokenizer's (read here)")
    s.add_argument("--tool-parser", default="auto", choices=["auto", "hermes", "llama3", "none"])
    s.add_argument("--profile-dir", default=None,
                   help="enables POST /start_profile and /stop_profile: torch.profiler traces of every rank go here")
    s.add_argument("--ray-address", default="auto",
                   help="Ray cluster to join (auto: this machine's, else start a local one; local: always new)")
    s.set_defaults(func=cmd_serve)


def _config(args) -> dict:
    keys = []
    for k in args.api_keys or []:
        keys += [x for x in k.split(",") if x]
    model = {"model": os.path.abspath(args.model), "tp": args.tp, "model_format": args.model_format,
             "dtype": args.dtype, "device": args.device, "max_batch_size": args.max_batch_size,
             "session_len": args.session_len, "cache_max_entry_count": args.cache_max_entry_count,
             "num_replicas": args.num_replicas, "autoscale": args.autoscale,
             "target_ongoing_requests": args.target_ongoing_requests, "num_cpus": args.num_cpus,
             "tool_parser": args.tool_parser,
             "profile_dir": os.path.abspath(args.profile_dir) if args.profile_dir else None}
    if args.name:
        model["name"] = args.name
    if args.chat_template:  # the text itself travels, so replicas on other nodes need no copy of the file
        from serving.tokenizer import resolve_chat_template

        model["chat_template"] = resolve_chat_template(args.chat_template)
    return {"models": [{k: v for k, v in model.items() if v is not None}], "api_keys": keys}


def cmd_serve(args) -> int:
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # small machines (DESIGN.md)
    from serving.app import run_local

    try:
        cfg = _config(args)
    except ValueError as e:  # a bad chat template: say so before any Ray work
        print(f"error: {e}", file=sys.stderr)
        return 2
    address = None if args.ray_address == "local" else args.ray_address
    server = run_local(config=cfg, port=args.port, host=args.host, address=address)
    print(f"serving {', '.join(server.model_names)} at {server.base_url} (chat page: {server.url}/); "
          "Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("shutting down", file=sys.stderr)
    server.shutdown()
    return 0
