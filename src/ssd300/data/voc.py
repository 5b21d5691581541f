"""Pascal VOC layout: ``Annotations/<id>.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``.

XML is parsed with defusedxml (no entity expansion, no external entities: a billion-laughs or an
external-entity file is refused in one line naming it). Coordinates are read as written, as
pixel-edge coordinates: ``xmin, ymin, xmax, ymax`` = COCO's ``x, y, x + w, y + h`` (as CVAT/datumaro
and LabelImg read and write them; the VOC devkit's 1-based "+1" convention is not applied).
Classes: ``labels.txt`` / ``classes.txt`` / datumaro's ``labelmap.txt`` in the root in label order,
else the sorted names found in the split (category ids 1..K). Image ids: the ids when all are whole
numbers, else 1..N in list order. ``difficult`` is kept as a per-box flag.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from ssd300.data.split_columns import SplitColumns, image_ids_of, read_class_list
from ssd300.errors import UserInputError, one_line

CLASS_FILES = ("labels.txt", "classes.txt", "labelmap.txt")


def parse_voc_xml(path: Path) -> Any:
    """The root element of a VOC XML file, parsed safely; one-line UserInputError naming the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{path}: annotation file does not exist") from None
    except OSError as err:
        raise UserInputError(f"{path}: not readable ({one_line(err)})") from None
    try:
        return fromstring(raw, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as err:
        raise UserInputError(f"{path}: refused: the XML declares entities or external references, which "
                             f"annotation files never need ({type(err).__name__})") from None
    except ParseError as err:
        raise UserInputError(f"{path}: not well-formed XML ({err})") from None


def _number(path: Path, where: str, text: Optional[str]) -> float:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserInputError(f"{path}: {where} must be a number, got {text!r}")
    return value


def read_voc_xml(path: Path) -> tuple[Optional[str], int, int, list[tuple[str, list[float], bool]]]:
    """(filename or None, width, height (0 if absent), [(class name, [xmin, ymin, xmax, ymax], difficult)])."""
    root = parse_voc_xml(path)
    if root.tag != "annotation":
        raise UserInputError(f"{path}: not a VOC annotation (root element <{root.tag}>, expected <annotation>)")
    filename = root.findtext("filename")
    size = root.find("size")
    width = height = 0
    if size is not None:
        width = round(_number(path, "<size>/<width>", size.findtext("width", "0")))
        height = round(_number(path, "<size>/<height>", size.findtext("height", "0")))
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"object {k + 1}" + (f" ({name})" if name else "")
        if not name:
            raise UserInputError(f"{path}: {where}: missing <name>")
        box = obj.find("bndbox")
        if box is None:
            raise UserInputError(f"{path}: {where}: missing <bndbox>")
        coords = [_number(path, f"{where}: <bndbox>/<{key}>", box.findtext(key))
                  for key in ("xmin", "ymin", "xmax", "ymax")]
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise UserInputError(f"{path}: {where}: xmax/ymax below xmin/ymin: {coords}")
        difficult = (obj.findtext("difficult") or "0").strip()
        objects.append((name, coords, difficult not in ("0", "", "false", "False")))
    return filename, width, height, objects


def read_voc_split(listing: Path) -> SplitColumns:
    """``ImageSets/Main/<split>.txt`` -> the split's columns (exact float64 boxes, difficult flags)."""
    root = listing.parent.parent.parent
    try:
        lines = listing.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{listing}: not a readable image-set list ({one_line(err)})") from None
    ids = [(number, line.split()[0]) for number, line in enumerate(lines, 1) if line.strip()]
    if not ids:
        raise UserInputError(f"{listing}: lists no images")
    class_file = next((root / n for n in CLASS_FILES if (root / n).is_file()), None)
    classes = read_class_list(class_file) if class_file is not None else None
    file_names: list[str] = []
    sizes: list[tuple[int, int]] = []
    counts: list[int] = []
    names: list[str] = []
    coords: list[list[float]] = []
    difficult: list[bool] = []
    seen: set[str] = set()
    for number, image_id in ids:
        if image_id in seen:
            raise UserInputError(f"{listing}:{number}: image {image_id!r} is listed twice")
        seen.add(image_id)
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise UserInputError(f"{xml}: annotation file does not exist (listed in {listing}:{number})")
        filename, width, height, objects = read_voc_xml(xml)
        file_name = filename if filename and Path(filename).stem == image_id else f"{image_id}.jpg"
        if width <= 0 or height <= 0:
            width, height = _image_size(xml, root / "JPEGImages" / file_name)
        file_names.append(file_name)
        sizes.append((width, height))
        counts.append(len(objects))
        for name, box, hard in objects:
            names.append(name)
            coords.append(box)
            difficult.append(hard)
    if classes is None:
        classes = sorted(set(names))
        if not classes:
            raise UserInputError(f"{listing}: no objects in any listed file, and no {' or '.join(CLASS_FILES)} "
                                 "in the dataset folder to name the classes")
    else:
        unknown = set(names) - set(classes)
        if unknown:
            raise UserInputError(f"{class_file}: does not list class {sorted(unknown)[0]!r}, found in "
                                 f"{root / 'Annotations'} (split {listing.stem})")
    category_of = {name: k + 1 for k, name in enumerate(classes)}
    return SplitColumns(
        categories=tuple((k + 1, name) for k, name in enumerate(classes)), image_ids=image_ids_of(file_names),
        file_names=file_names, sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        box_counts=np.asarray(counts, dtype=np.int64), boxes=np.asarray(coords, dtype=np.float64).reshape(-1, 4),
        category_ids=np.asarray([category_of[n] for n in names], dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool))


def _image_size(xml: Path, image: Path) -> tuple[int, int]:
    """The size from the image's header when the XML has none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:
            return opened.size
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserInputError(f"{xml}: no <size> and the image's size cannot be read ({one_line(err)})") from None
