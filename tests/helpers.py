"""Shared test helpers."""
from genserve.cli import build_parser


def run_cli(*argv: str) -> None:
    """Run a `genserve` command in-process; errors raise instead of becoming exit codes."""
    args = build_parser().parse_args(list(argv))
    args.func(args)
