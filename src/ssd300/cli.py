"""Command-line entry point: ``ssd300 <command> ...``.

Each command lives in its own module under ``ssd300.commands`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``ssd300 --help`` stays fast and a broken optional dependency only affects its command.

For users migrating from NVIDIA's reference, ``ssd300 --mode training --data ...`` (no
command word, the reference's flags) is accepted and routed to ``train``, which handles
every ``--mode``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ssd300.errors import UserInputError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ssd300.commands.train", "train (or benchmark) SSD300; accepts the reference's flags and --mode"),
    "evaluate": ("ssd300.commands.evaluate", "evaluate a checkpoint with the COCO metric"),
    "detect": ("ssd300.commands.detect", "run a checkpoint on images, write JSON and annotated images"),
    "export": ("ssd300.commands.export", "export a checkpoint to ONNX or TorchScript"),
    "synth": ("ssd300.commands.synth", "write the built-in synthetic COCO-format dataset"),
    "demo": ("ssd300.commands.demo", "generate the synthetic dataset, train, evaluate and draw results"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd300", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv = ["train", *argv]  # reference-style command line
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"ssd300 {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from ssd300.logging_utils import configure_logging

    configure_logging()  # warnings (ours and libraries') above the progress bars, not through them
    try:
        return int(module.run(args) or 0)
    except UserInputError as err:
        print(f"ssd300 {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ssd300 {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
