"""The ``rayawq`` command: one entry point, subcommands registered by the packages that own them."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayawq", description="AWQ 4-bit quantization on Ray, and serving")
    sub = parser.add_subparsers(dest="command", required=True)
    from quant import cli as quant_cli

    quant_cli.register(sub)
    try:
        from serving import cli as serving_cli
    except ImportError:
        serving_cli = None
    if serving_cli is not None and hasattr(serving_cli, "register"):
        serving_cli.register(sub)
    from cluster import demo, eval_cmd, serve_cmd

    eval_cmd.register(sub)
    serve_cmd.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from quant.cli import run

    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
