"""``ssd300 convert``: VOC / YOLO / LabelMe -> COCO json, COCO -> YOLO / VOC (see :mod:`ssd300.data.convert`)."""

from __future__ import annotations

import argparse

from ssd300.data.convert import IMAGE_MODES, coco_to_voc, coco_to_yolo, labelme_to_coco, split_to_coco
from ssd300.data.layouts import SPLITS, find_split
from ssd300.errors import UserInputError

FIELD_FLAGS = {"output": "--out"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, choices=("coco", "voc", "yolo", "labelme"),
                        help="the input format")
    parser.add_argument("--to", dest="target", required=True, choices=("coco", "yolo", "voc"), help="the output format")
    parser.add_argument("--data", required=True,
                        help="the input dataset folder (LabelMe: the folder of .json files)")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="the split to convert (default: to COCO, required; from COCO, every split found)")
    parser.add_argument("--out", required=True,
                        help="to COCO: the json file to write; to YOLO/VOC: the dataset folder to write into")
    parser.add_argument("--images", choices=IMAGE_MODES, default="link",
                        help="to YOLO/VOC: how images get into the new layout (link: hard links, copies where "
                             "impossible)")
    parser.add_argument("--prefix", default="",
                        help="to VOC: prefix of the image ids, '{split}' replaced by the split's name (VOC keeps "
                             "every split's images in one folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    if args.target == "coco":
        if args.source == "coco":
            raise UserInputError("--from coco --to coco: nothing to convert")
        if args.source == "labelme":
            report = labelme_to_coco(args.data, args.out, overwrite=args.overwrite)
        else:
            if args.split is None:
                raise UserInputError(f"--from {args.source} --to coco writes one split: give --split train or val")
            report = split_to_coco(args.data, args.split, args.out, data_format=args.source,
                                   overwrite=args.overwrite)
        print(f"wrote {report.summary()}")
        return 0
    if args.source != "coco":
        raise UserInputError(f"--from {args.source} --to {args.target}: convert to COCO first (--to coco), "
                             f"then --from coco --to {args.target}")
    splits = [args.split] if args.split else [s for s in SPLITS if _has_split(args.data, s)]
    if not splits:
        find_split(args.data, "train", "coco")  # raises the one-line reason
    for split in splits:
        source = find_split(args.data, split, "coco")
        if args.target == "yolo":
            report = coco_to_yolo(source.annotations, source.image_dir, args.out, split, images=args.images,
                                  overwrite=args.overwrite)
        else:
            report = coco_to_voc(source.annotations, source.image_dir, args.out, split, images=args.images,
                                 prefix=args.prefix.replace("{split}", split), overwrite=args.overwrite)
        print(f"{split}: wrote {report.summary()}")
    return 0


def _has_split(root: str, split: str) -> bool:
    try:
        find_split(root, split, "coco")
    except UserInputError:
        return False
    return True
