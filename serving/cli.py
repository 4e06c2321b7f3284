"""``rayawq chat MODEL`` and ``rayawq generate MODEL --prompt TEXT``; wired into ``cluster/cli.py`` by
``register(subparsers)``."""

from __future__ import annotations

import argparse
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (AWQ checkpoint or FP16/BF16 HF model)")
    p.add_argument("--model-format", default="auto", choices=["auto", "awq", "hf"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)")
    p.add_argument("--session-len", type=int, default=None, help="max tokens of a conversation")
    p.add_argument("--cache-max-entry-count", type=float, default=0.8,
                   help="fraction of free GPU memory for the KV cache")
    p.add_argument("--max-batch-size", type=int, default=None, help="sequences decoded together")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template, or a file holding one, replacing the tokenizer's")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (GPUs), each a Ray actor; starts a local Ray unless one is running")


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="complete one prompt and print only the completion")
    _engine_args(g)
    g.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    _sampling_args(g, temperature=0.0)
    g.set_defaults(func=generate_main)
    c = subparsers.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    _engine_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c, temperature=0.0)
    c.set_defaults(func=chat_main)


def _build(args, max_batch: int):
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    from .config import EngineConfig
    from .pipeline import pipeline

    cfg = EngineConfig(model_format=args.model_format, dtype=args.dtype, device=args.device,
                       session_len=args.session_len, cache_max_entry_count=args.cache_max_entry_count,
                       max_num_seqs=args.max_batch_size or max_batch, enforce_eager=args.eager,
                       progress=sys.stderr.isatty(), tp=args.tp, chat_template=args.chat_template)
    return pipeline(args.model, cfg)


def _gen_config(args):
    from .sampling_params import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                            random_seed=args.seed).validate()


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def generate_main(args) -> int:
    from .config import CheckpointError, InvalidRequestError

    try:
        gen = _gen_config(args)
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        with _build(args, max_batch=1) as pipe:
            out = pipe(prompt, gen, do_preprocess=args.chat)
    except (CheckpointError, InvalidRequestError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        return _fail(e)
    sys.stdout.write(out.text + "\n")
    sys.stdout.flush()
    return 0


def chat_main(args) -> int:
    from .config import CheckpointError, InvalidRequestError

    try:
        gen = _gen_config(args)
        pipe = _build(args, max_batch=1)
    except (CheckpointError, InvalidRequestError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        return _fail(e)
    with pipe:
        return _chat_loop(ChatSession(pipe, gen, system=args.system))


def _chat_loop(session: "ChatSession") -> int:
    from .config import InvalidRequestError

    print("Chat with the model. /reset starts over, /exit quits.", flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if not cmd:
            continue
        try:
            for piece in session.send(line):
                print(piece, end="", flush=True)
            print(flush=True)
        except InvalidRequestError as e:
            print(f"error: {e}", flush=True)
            session.undo()
        except KeyboardInterrupt:
            print("\n(interrupted)", flush=True)
            session.undo()


class ChatSession:
    """A conversation over a pipeline: history of turns, streamed answers; prefix caching reuses the past."""

    def __init__(self, pipe, gen_config=None, system: str | None = None):
        self.pipe, self.gen, self.system = pipe, gen_config, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def undo(self) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def send(self, text: str):
        """Yields the answer piece by piece; the full answer joins the history at the end."""
        self.messages.append({"role": "user", "content": text})
        answer = []
        has_template = getattr(self.pipe.tokenizer, "chat_template", None)
        prompt = list(self.messages) if has_template else self._plain()
        for r in self.pipe.stream_infer(prompt, self.gen, do_preprocess=bool(has_template)):
            answer.append(r.text)
            if r.text:
                yield r.text
        self.messages.append({"role": "assistant", "content": "".join(answer)})

    def _plain(self) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in self.messages) + "assistant:"


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m serving.cli chat MODEL``), the same subcommands as ``rayawq``."""
    parser = argparse.ArgumentParser(prog="rayawq")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
