"""Conversions between annotation formats: VOC / YOLO / LabelMe -> COCO json, COCO -> YOLO / VOC.

Lossless for boxes and class names: coordinates are written with Python's shortest exact float
form (``repr``), whole numbers as integers; YOLO's normalised values round trip within ~1e-12 px.
What a format cannot hold is said in :class:`ConversionReport` ``notes`` (COCO crowd regions have no
YOLO equivalent and are dropped; they become ``difficult`` objects in VOC, its ignore flag). Image ids
and category ids are not stored by VOC/YOLO: they come back as the readers assign them (numeric
file stems as image ids, categories 1..K in class order). Every output path is checked before any
work; existing outputs are refused unless ``overwrite``. Images are hard-linked into the new layout
(copied where links are impossible), or copied / symlinked / left out (``images``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from ssd300.data.annotations import read_annotation_file
from ssd300.data.split_columns import SplitColumns
from ssd300.data.layouts import columns_to_coco, find_split, read_columns
from ssd300.errors import UserInputError, one_line
from ssd300.files import PathLike, atomic_write, check_output_path, write_json

IMAGE_MODES = ("link", "copy", "symlink", "none")


@dataclass
class ConversionReport:
    """What a conversion wrote."""

    output: Path
    images: int = 0
    boxes: int = 0
    categories: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        notes = "; " + "; ".join(self.notes) if self.notes else ""
        return f"{self.output}: {self.images} images, {self.boxes} boxes, {self.categories} classes{notes}"


def number_text(value: float) -> str:
    """Shortest exact text of a coordinate: ``12`` for 12.0, ``repr`` otherwise."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _check_images_mode(images: str) -> None:
    if images not in IMAGE_MODES:
        raise UserInputError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}", fields=("images",))


def _refuse_existing(path: Path, overwrite: bool, field_name: str = "output") -> None:
    if path.exists() and not overwrite:
        raise UserInputError(f"{field_name} {path}: exists (give overwrite to replace it)",
                             fields=(field_name, "overwrite"))


def _place_image(source: Path, target: Path, mode: str, overwrite: bool) -> None:
    if mode == "none":
        return
    if target.exists() or target.is_symlink():
        if source.exists() and target.exists() and os.path.samefile(source, target):
            return
        if not overwrite:
            raise UserInputError(f"output {target}: exists (another split's image of the same name? give a prefix; "
                                 "or overwrite)", fields=("output",))
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if mode == "symlink":
            target.symlink_to(source.resolve())
            return
        if mode == "link":
            try:
                os.link(source, target)
                return
            except OSError:
                pass  # another file system, or links not allowed: copy
        shutil.copy2(source, target)
    except OSError as err:
        raise UserInputError(f"{source}: cannot place it as {target} ({one_line(err)})") from None


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as handle:
        handle.write(text)


# ----------------------------------------------------------------------------- -> COCO


def split_to_coco(root: PathLike, split: str, output: PathLike, *, data_format: str = "auto",
                  overwrite: bool = False) -> ConversionReport:
    """A VOC or YOLO dataset folder's split -> a COCO instances json (``output``)."""
    out = check_output_path(output, "output", folder=False)
    _refuse_existing(out, overwrite)
    source = find_split(root, split, data_format)
    if source.format == "coco":
        raise UserInputError(f"data {root}: is already COCO json ({source.annotations})", fields=("data",))
    return _write_coco(read_columns(source.annotations), out, source.format)


def _write_coco(columns: SplitColumns, out: Path, kind: str) -> ConversionReport:
    data = columns_to_coco(columns)
    report = ConversionReport(out, len(data["images"]), len(data["annotations"]), len(data["categories"]))
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    if crowd:
        report.notes.append(f"{crowd} difficult boxes written as iscrowd 1 (COCO's ignore regions)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"info": {"description": f"converted from {kind} by ssd300 convert"}, **data})
    return report


def labelme_to_coco(folder: PathLike, output: PathLike, *, overwrite: bool = False) -> ConversionReport:
    """A folder of LabelMe json files (one per image) -> a COCO instances json.

    Rectangles keep their two corners; polygons and circles become their bounding boxes; lines and
    points are skipped (counted). Classes in order of first appearance over the sorted files (ids 1..K);
    image ``file_name`` is the json's ``imagePath`` relative to ``folder``.
    """
    from ssd300.data.labelme import read_labelme_folder

    out = check_output_path(output, "output", folder=False)
    _refuse_existing(out, overwrite)
    columns, skipped = read_labelme_folder(Path(folder))
    report = _write_coco(columns, out, "LabelMe")
    if skipped:
        report.notes.append(f"{skipped} shapes that are not boxes, polygons or circles skipped")
    return report


# ----------------------------------------------------------------------------- COCO ->


def _read_coco(annotation_file: PathLike, image_dir: PathLike) -> tuple[dict[str, Any], Path]:
    data = read_annotation_file(annotation_file)
    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserInputError(f"images {folder}: image folder does not exist", fields=("images",))
    return data, folder


def _boxes_by_image(data: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    by_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    return by_image


def coco_to_yolo(annotation_file: PathLike, image_dir: PathLike, output: PathLike, split: str, *,
                 images: str = "link", overwrite: bool = False) -> ConversionReport:
    """A COCO json + its images -> ``output/{images,labels}/<split>/`` and ``output/data.yaml``.

    Class index k is the k-th category of the json (its order); ``data.yaml`` gets ``names`` and the
    split's image folder. A second split into the same ``output`` must have the same categories.
    """
    _check_images_mode(images)
    root = check_output_path(output, "output", folder=True)
    labels_dir, images_dir, yaml_file = root / "labels" / split, root / "images" / split, root / "data.yaml"
    _refuse_existing(labels_dir, overwrite)
    data, folder = _read_coco(annotation_file, image_dir)
    names = [str(c["name"]) for c in data["categories"]]
    index_of = {c["id"]: k for k, c in enumerate(data["categories"])}
    splits = {split: f"images/{split}"}
    if yaml_file.is_file():
        from ssd300.data.yolo import read_yolo_names

        _, existing = read_yolo_names(root)
        if existing != names and not overwrite:
            raise UserInputError(f"output {yaml_file}: names other classes ({existing[:3]}...) than "
                                 f"{annotation_file}", fields=("output",))
        import yaml

        old = yaml.safe_load(yaml_file.read_text(encoding="utf-8")) or {}
        splits = {**{k: old[k] for k in ("train", "val", "test") if isinstance(old.get(k), str)}, **splits}
    report = ConversionReport(root, categories=len(names))
    by_image = _boxes_by_image(data)
    crowd = 0
    for img in data["images"]:
        width, height = float(img["width"]), float(img["height"])
        lines = []
        for ann in by_image[img["id"]]:
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            values = ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)
            lines.append(" ".join([str(index_of[ann["category_id"]]), *(repr(v) for v in values)]))
            report.boxes += 1
        name = Path(img["file_name"])
        _write_text(labels_dir / name.with_suffix(".txt"), "".join(line + "\n" for line in lines))
        _place_image(folder / name, images_dir / name, images, overwrite)
        report.images += 1
    import yaml

    _write_text(yaml_file, yaml.safe_dump({"path": ".", **splits, "nc": len(names), "names": names},
                                          sort_keys=False, allow_unicode=True))
    if crowd:
        report.notes.append(f"{crowd} crowd regions dropped (YOLO has no ignore regions)")
    return report


def coco_to_voc(annotation_file: PathLike, image_dir: PathLike, output: PathLike, split: str, *,
                images: str = "link", prefix: str = "", overwrite: bool = False) -> ConversionReport:
    """A COCO json + its images -> ``output/{Annotations,JPEGImages,ImageSets/Main/<split>.txt}`` and
    ``output/labels.txt`` (the class order). Image ``a/b.jpg`` gets the id ``<prefix>b``; crowd
    regions become ``difficult`` objects. Coordinates: ``xmin = x, xmax = x + w`` (pixel edges)."""
    _check_images_mode(images)
    root = check_output_path(output, "output", folder=True)
    listing, labels_file = root / "ImageSets" / "Main" / f"{split}.txt", root / "labels.txt"
    _refuse_existing(listing, overwrite)
    data, folder = _read_coco(annotation_file, image_dir)
    names = [str(c["name"]) for c in data["categories"]]
    if labels_file.is_file() and not overwrite:
        from ssd300.data.split_columns import read_class_list

        if read_class_list(labels_file) != names:
            raise UserInputError(f"output {labels_file}: lists other classes than {annotation_file}",
                                 fields=("output",))
    name_of = {c["id"]: str(c["name"]) for c in data["categories"]}
    report = ConversionReport(root, categories=len(names))
    ids: list[str] = []
    seen: set[str] = set()
    by_image = _boxes_by_image(data)
    crowd = 0
    for img in data["images"]:
        source = Path(img["file_name"])
        image_id = f"{prefix}{source.stem}"
        if image_id in seen:
            raise UserInputError(f"{annotation_file}: two images have the id {image_id!r} in VOC (file names "
                                 "differ only by folder or suffix)")
        ids.append(image_id)
        seen.add(image_id)
        file_name = image_id + source.suffix
        objects = []
        for ann in by_image[img["id"]]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            hard = int(bool(ann.get("iscrowd", 0)))
            crowd += hard
            corners = (x, y, x + w, y + h)
            box = "".join(f"<{k}>{number_text(v)}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), corners))
            objects.append(f"  <object><name>{escape(name_of[ann['category_id']])}</name><pose>Unspecified</pose>"
                           f"<truncated>0</truncated><difficult>{hard}</difficult><bndbox>{box}</bndbox></object>\n")
            report.boxes += 1
        xml = (f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{escape(file_name)}</filename>\n"
               f"  <size><width>{number_text(img['width'])}</width><height>{number_text(img['height'])}</height>"
               f"<depth>3</depth></size>\n  <segmented>0</segmented>\n{''.join(objects)}</annotation>\n")
        xml_file = root / "Annotations" / f"{image_id}.xml"
        _refuse_existing(xml_file, overwrite)
        _write_text(xml_file, xml)
        _place_image(folder / source, root / "JPEGImages" / file_name, images, overwrite)
        report.images += 1
    _write_text(labels_file, "".join(n + "\n" for n in names))
    _write_text(listing, "".join(i + "\n" for i in ids))
    if crowd:
        report.notes.append(f"{crowd} crowd regions written as difficult objects")
    return report

