"""``ssd300 check-data DATA``: the dataset check of :mod:`ssd300.data.check` as a terminal table
(or JSON), with the report and its figure in ``--out``. Exit status 0 clean, 1 a problem found,
2 bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ssd300.data.check import HEADER_CHECKS, SPLITS, check_dataset, plot_report
from ssd300.data.layouts import DATA_FORMATS
from ssd300.files import check_output_path, write_json

FIELD_FLAGS = {"data": "DATA"}


def _header_checks(value: str) -> Optional[int]:
    if value == "all":
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of images or 'all', got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'all', got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, metavar="DATA", help="dataset folder")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                        help="dataset layout (auto: detected from the folder)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="splits to check (those present)")
    parser.add_argument("--header-checks", type=_header_checks, default=HEADER_CHECKS, metavar="N",
                        help="images per split whose header is read for the size/EXIF check: a number "
                             "(0: none; more images than N: an even sample) or 'all'")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for check-data.json and check-data.png (box sizes, per-class counts)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--strict", action="store_true",
                        help="warnings (images without boxes, a class missing from val) fail the check too")


def run(args: argparse.Namespace) -> int:
    out: Optional[Path] = check_output_path(args.out, "out", folder=True) if args.out is not None else None
    report = check_dataset(args.data, args.splits, data_format=args.data_format, header_checks=args.header_checks)
    if out is not None:
        write_json(out / "check-data.json", report.as_dict(), layout="indent")
        plot_report(report, out / "check-data.png")
    if args.json:
        print(json.dumps({**report.as_dict(), "exit_status": report.exit_status(args.strict)}, indent=1))
    else:
        print(report.table())
        if out is not None:
            print(f"\n  report and figure: {out / 'check-data.json'}, {out / 'check-data.png'}")
        status = report.exit_status(args.strict)
        print(f"\n  {'FAILED' if status else 'OK'}: {len(report.problems(args.strict))} problems "
              f"({len(report.findings)} findings)", file=sys.stderr if status else sys.stdout)
    return report.exit_status(args.strict)
