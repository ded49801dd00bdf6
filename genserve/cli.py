"""The `genserve` command."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from importlib.metadata import version


def _train(args: argparse.Namespace) -> None:
    from families.train import train

    card = train(args.family, steps=args.steps, seed=args.seed, save_every=args.save_every)
    print(json.dumps({k: card[k] for k in ("family", "training_steps", "train_seconds", "final_losses",
                                           "parameters")}, indent=2))


def _evaluate(args: argparse.Namespace) -> None:
    from families.evaluate import evaluate_command

    evaluate_command(args)


def build_parser() -> argparse.ArgumentParser:
    """Every `genserve` subcommand; each sets `func(args)`, which raises on error (main() reports it)."""
    parser = argparse.ArgumentParser(prog="genserve", description="Serve generative image models.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--version", action="version", version=f"genserve {version('genserve')}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one family on Fashion-MNIST (resumable)")
    p.add_argument("family", choices=("vae", "gan", "flow", "pixelcnn", "diffusion", "classifier"))
    p.add_argument("--steps", type=int, default=None, help="total steps (default: the family's config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints")
    p.set_defaults(func=_train)

    from families.evaluate import add_evaluate_arguments
    p = sub.add_parser("evaluate", help="measure sample quality and likelihood of trained families")
    add_evaluate_arguments(p)
    p.set_defaults(func=_evaluate)

    from genserve import anomaly, build as build_command, loadtest_cli, store_cli, up
    build_command.register(sub)
    store_cli.register(sub)
    up.register(sub)
    loadtest_cli.register(sub)
    anomaly.register(sub)
    return parser


def _stop_now(signum, frame):
    """Ctrl-C while the command line is still being read (its imports: torch, ONNX Runtime, Ray): nothing has
    started, so exit at once, as a shell reports it (130), skipping the interpreter's teardown, which can hang
    on a library whose import the interrupt cut short (CI saw `genserve up` never exit that way)."""
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # a Ctrl-C its parent ignores stays ignored
        signal.signal(signal.SIGINT, _stop_now)
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGINT, previous)  # the command's own Ctrl-C: KeyboardInterrupt (up: its handler)
    if args.command != "up":  # `up` keeps Python's EPIPE errors: it owns sockets a client may drop
        # Die quietly when the reader of our output goes away (`genserve store ls | head`), as Unix tools do.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.threads:
        import torch  # only here: `genserve up` and `store` start faster without it

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"genserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a command took charge of it: stop quietly, as Unix tools do
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
