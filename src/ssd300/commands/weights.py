"""``ssd300 weights``: the published weights by name, whether each is cached, and where the caches are.

``--fetch NAME`` downloads one (once: a cached file is kept) and verifies it, e.g. before going offline.
"""

from __future__ import annotations

import argparse

from ssd300.files import cache_dir
from ssd300.weights import registry, describe_cache, torch_hub_checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fetch", metavar="NAME", choices=sorted(registry()), default=None,
                        help="download (once) and verify these weights now")


def _size(n: object) -> str:
    return f"{n / 2**20:.1f} MiB" if isinstance(n, int) else "size unknown"


def run(args: argparse.Namespace) -> int:
    if args.fetch is not None:
        entry = registry()[args.fetch]
        if entry.kind == "checkpoint":
            from ssd300.checkpoint import resolve_checkpoint

            path = resolve_checkpoint(entry.name)
        else:
            from ssd300.backbone import imagenet_weights_path

            path = imagenet_weights_path(entry.name.split("-", 1)[1])
        print(f"{entry.name}: {path}")
        return 0
    for row in describe_cache():
        state = f"cached, {_size(row['size'])}" if row["cached"] else "not cached"
        print(f"{row['name']:<20} {row['kind']:<10} {state:<22} {row['description']}")
        print(f"{'':<20} {row['url']}")
    print(f"cache: {torch_hub_checkpoints()} (torchvision's: $TORCH_HOME), {cache_dir('weights')} "
          "(checkpoints and URLs: $SSD300_CACHE_DIR)")
    return 0
