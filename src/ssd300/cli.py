"""Command-line entry point: ``ssd300 <command> ...``.

Each command lives in its own module under ``ssd300.commands`` and provides
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily so that
``ssd300 --help`` stays fast and a broken optional dependency only affects its command.

For users migrating from NVIDIA's reference, ``ssd300 --mode training --data ...`` (no
command word, the reference's flags) is accepted and routed to ``train``, which handles
every ``--mode``. Exit codes: :mod:`ssd300.errors`.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Any, Sequence

from ssd300 import __version__
from ssd300.errors import EXIT_CODES, EXIT_USAGE, Interrupted, UserInputError

DESCRIPTION = "SSD300 v1.1 object detector (NVIDIA's reference, ResNet backbones): train, evaluate, detect, export."
EPILOG = ("Run 'ssd300 COMMAND --help' for a command's flags. Reference-style command lines "
          "('ssd300 --mode training --data DIR ...') run 'train'. Exit codes: "
          + ", ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".")

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ssd300.commands.train", "train (or benchmark) SSD300; accepts the reference's flags and --mode"),
    "evaluate": ("ssd300.commands.evaluate", "evaluate a checkpoint with the COCO metric"),
    "detect": ("ssd300.commands.detect", "run a checkpoint or an exported ONNX/pt2/TorchScript file on images, "
                                         "write JSON and annotated images"),
    "serve": ("ssd300.commands.serve", "serve a checkpoint or exported file over HTTP (KServe v2 protocol, "
                                       "image uploads, a page to try it) with batching and worker processes"),
    "export": ("ssd300.commands.export", "export a checkpoint to ONNX, pt2 (torch.export) or TorchScript"),
    "check-data": ("ssd300.commands.check_data", "check a dataset (counts, box sizes, duplicates, bad boxes, "
                   "split overlap) before training; exit 1 when a problem is found"),
    "synth": ("ssd300.commands.synth", "write the built-in synthetic COCO-format dataset"),
    "convert": ("ssd300.commands.convert", "convert annotations: VOC/YOLO/LabelMe to COCO json, COCO to YOLO/VOC"),
    "demo": ("ssd300.commands.demo", "generate the synthetic dataset, train, evaluate and draw results"),
    "weights": ("ssd300.commands.weights", "list the published weights (ImageNet, NVIDIA's COCO SSD300), the cache"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's default in its help, "(default: X)", unless the help already states it or
    there is none to state (None, False, a suppressed value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or text == argparse.SUPPRESS):
            return text
        shown = " ".join(str(v) for v in default) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def _help_for_defaults(parser: argparse.ArgumentParser) -> None:
    """argparse prints nothing for a flag without help text, so give those a line for their default."""
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
                else action.default
            action.help = f"(default: {shown})".replace("%", "%%")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssd300", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"ssd300 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h", "--version"):
        argv = ["train", *argv]  # reference-style command line
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser = _build_parser()
        if argv and argv[0] not in ("-h", "--help", "--version"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        if argv and argv[0] == "--version":
            parser.parse_args(["--version"])  # prints and exits 0
        parser.print_help()
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"ssd300 {name}", description=COMMANDS[name][1],
                                     formatter_class=HelpFormatter)
    module.add_arguments(parser)
    _help_for_defaults(parser)
    args = parser.parse_args(rest)
    from ssd300.logging_utils import configure_logging

    configure_logging()  # warnings (ours and libraries') above the progress bars, not through them
    previous = _raise_on_sigterm()
    try:
        return int(module.run(args) or 0)
    except UserInputError as err:
        from ssd300.commands.options import cli_message

        # A command module may spell some fields its own way (FIELD_FLAGS), e.g. demo's image counts.
        print(f"ssd300 {name}: error: {cli_message(err, getattr(module, 'FIELD_FLAGS', None))}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:
        print(f"ssd300 {name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"ssd300 {name}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # a full disk under a writer that does not name its file: still one line
        from ssd300.files import find_disk_error

        found = find_disk_error(exc)
        if found is None:
            raise
        where = f"{found.filename}: " if found.filename else ""
        print(f"ssd300 {name}: error: {where}could not be written ({found.strerror or found})", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm() -> Any:
    """SIGTERM raises :class:`Interrupted` (exit 143 after cleanup) instead of killing the process
    outright; training replaces it with its own handler (a checkpoint first). Returns the
    previous handler (None off the main thread)."""
    def handler(signum: int, frame: Any) -> None:
        raise Interrupted("terminated (SIGTERM)", signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
