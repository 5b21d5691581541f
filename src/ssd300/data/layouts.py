"""Dataset folder layouts (COCO json, Pascal VOC, YOLO): detection, the files of a split, and reading
a split into the one flat index every layout shares (:class:`~ssd300.data.annotations.ParsedAnnotations`).

Everything downstream (the dataset, loaders, label-map checks, evaluation) sees only that index and
the split's *annotation source*, a path whose kind names the reader:

* a file in ``ImageSets/Main/``: a VOC image-set list (``ImageSets/Main/<split>.txt``; XMLs in ``Annotations/``);
* any other file: COCO instances json (``annotations/instances_<split>[2017].json``);
* a folder: YOLO labels (``labels/<split>/`` or ``<split>/labels/``; images in the twin ``images`` folder).

:func:`detect_format` tells a dataset root's layout, :func:`find_split` finds a split's files
(cheap: nothing is parsed), :func:`read_split` also reads it, :func:`read_annotations` reads an
annotation source, :func:`load_ground_truth` gives the COCO ground-truth object evaluation scores
against (VOC ``difficult`` boxes become ``iscrowd`` ignore regions, see :func:`columns_to_coco`).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from ssd300.data.annotations import ParsedAnnotations, load_annotations
from ssd300.data.split_columns import SplitColumns
from ssd300.data.images import is_image_file
from ssd300.errors import UserInputError
from ssd300.files import PathLike

FORMATS = ("coco", "voc", "yolo")
DATA_FORMATS = ("auto", *FORMATS)
SPLITS = ("train", "val")
YOLO_SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid")}


def _data_error(root: Path, problem: str) -> UserInputError:
    return UserInputError(f"data {root}: {problem}", fields=("data",))


def check_data_format(data_format: str) -> None:
    if data_format not in DATA_FORMATS:
        raise UserInputError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}",
                             fields=("data_format",))


def _coco_candidates(root: Path, split: str) -> list[tuple[Path, Path]]:
    return [(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"),
            (root / split, root / "annotations" / f"instances_{split}.json")]


def _yolo_candidates(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(images folder, labels folder): Ultralytics' ``images/<split>``, Roboflow's ``<split>/images``."""
    out = []
    for name in YOLO_SPLIT_NAMES[split]:
        out += [(root / "images" / name, root / "labels" / name), (root / name / "images", root / name / "labels")]
    return out


def detect_format(root: PathLike) -> str:
    """"coco", "voc" or "yolo" from the folder layout (see the module docstring); UserInputError if none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _data_error(root, "dataset folder does not exist")
    found = _detect(root)
    if found is None:
        raise _data_error(root, "no known dataset layout: expected COCO (annotations/instances_<split>.json), "
                                "VOC (Annotations/, ImageSets/Main/<split>.txt, JPEGImages/) or YOLO "
                                "(images/<split>/, labels/<split>/, data.yaml or classes.txt)")
    return found


def _detect(root: Path) -> Optional[str]:
    if any(a.is_file() for split in SPLITS for _, a in _coco_candidates(root, split)):
        return "coco"
    if (root / "Annotations").is_dir() and (root / "ImageSets" / "Main").is_dir():
        return "voc"
    if any(labels.is_dir() for split in SPLITS for _, labels in _yolo_candidates(root, split)):
        return "yolo"
    return None


@dataclass(frozen=True)
class SplitSource:
    """Where a split's images and annotations are (nothing read yet)."""

    format: str          # "coco" | "voc" | "yolo"
    image_dir: Path
    annotations: Path    # the annotation source (module docstring)

    def read(self, cache_dir: Union[PathLike, None] = "auto") -> ParsedAnnotations:
        return read_annotations(self.annotations, cache_dir=cache_dir)


class DataSplit(NamedTuple):
    """:func:`read_split`'s result: ``image_dir, annotations, source = read_split(...)``."""

    image_dir: Path
    annotations: ParsedAnnotations
    source: SplitSource


def find_split(root: PathLike, split: str, data_format: str = "auto") -> SplitSource:
    """A dataset folder's split ("train" or "val") in its layout (``data_format`` "auto": detected).

    Errors name the folder as the field ``data`` (``TrainConfig.data``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    check_data_format(data_format)
    root = Path(root).expanduser()
    if root.is_file():
        raise UserInputError(
            f"data {root}: is a file; data takes a dataset folder (holding {split}/ or {split}2017/ and "
            f"annotations/instances_{split}.json, or a VOC/YOLO layout); for a single COCO-format json give it as "
            f"{split}_annotations with its image folder as {split}_images",
            fields=("data", f"{split}_annotations", f"{split}_images"))
    if not root.is_dir():
        raise _data_error(root, "dataset folder does not exist")
    fmt = _detect(root) if data_format == "auto" else data_format
    if fmt is None:
        expected = " or ".join(str(a.relative_to(root)) for _, a in _coco_candidates(root, split))
        raise _data_error(root, f"no annotation file for split {split!r} (expected {expected}; or a VOC layout: "
                                f"ImageSets/Main/{split}.txt, Annotations/, JPEGImages/; or a YOLO layout: "
                                f"images/{split}/, labels/{split}/)")
    if fmt == "coco":
        found = _find_pair(root, split, _coco_candidates(root, split), "annotation file")
    elif fmt == "voc":
        found = _find_voc(root, split)
    else:
        found = _find_pair(root, split, _yolo_candidates(root, split), "labels folder")
    image_dir, annotations = found
    if not any(is_image_file(p) for p in image_dir.iterdir()):
        raise _data_error(root, f"the {split} split is empty: image folder {image_dir} has no images")
    return SplitSource(fmt, image_dir, annotations)


def _find_pair(root: Path, split: str, candidates: list[tuple[Path, Path]], what: str) -> tuple[Path, Path]:
    for image_dir, source in candidates:
        if source.exists():
            if not image_dir.is_dir():
                raise _data_error(root, f"found {source} but no image folder {image_dir}")
            return image_dir, source
    expected = " or ".join(str(a.relative_to(root)) for _, a in candidates)
    raise _data_error(root, f"no {what} for split {split!r} (expected {expected})")


def _find_voc(root: Path, split: str) -> tuple[Path, Path]:
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise _data_error(root, f"no image-set list for split {split!r} (expected {listing.relative_to(root)})")
    if not (root / "Annotations").is_dir():
        raise _data_error(root, "found ImageSets/Main but no Annotations folder")
    if not (root / "JPEGImages").is_dir():
        raise _data_error(root, "found ImageSets/Main but no image folder JPEGImages")
    return root / "JPEGImages", listing


def read_split(root: PathLike, split: str, data_format: str = "auto",
               cache_dir: Union[PathLike, None] = "auto") -> DataSplit:
    """:func:`find_split` + :func:`read_annotations`: the image folder and the validated flat index."""
    source = find_split(root, split, data_format)
    return DataSplit(source.image_dir, source.read(cache_dir), source)


def split_image_files(source: SplitSource) -> list[Path]:
    """The split's image files, sorted (VOC: those of the image-set list, not all of JPEGImages)."""
    files = sorted(p for p in source.image_dir.iterdir() if p.is_file() and is_image_file(p))
    if source.format == "voc":
        lines = source.annotations.read_text(encoding="utf-8-sig").splitlines()
        listed = {line.split()[0] for line in lines if line.strip()}
        files = [p for p in files if p.stem in listed]
    return files


def dataset_image_files(root: PathLike) -> Optional[list[Path]]:
    """A dataset folder's training images (the validation split's when it has no training split);
    None when ``root`` is no known dataset layout."""
    root = Path(root)
    if not root.is_dir() or _detect(root) is None:
        return None
    for split in SPLITS:
        try:
            return split_image_files(find_split(root, split))
        except UserInputError:
            continue
    return None


def format_of_source(annotations: PathLike) -> str:
    """The reader an annotation source needs: a folder YOLO, a file in ``ImageSets/Main/`` (not .json)
    VOC, any other file COCO json."""
    path = Path(annotations)
    if path.is_dir():
        return "yolo"
    in_image_sets = path.parent.name == "Main" and path.parent.parent.name == "ImageSets"
    return "voc" if in_image_sets and path.suffix.lower() != ".json" else "coco"


def read_columns(annotations: PathLike) -> SplitColumns:
    """A VOC image-set list's or a YOLO labels folder's split as exact float64 columns (the converter's input)."""
    path = Path(annotations)
    fmt = format_of_source(path)
    if fmt == "voc":
        from ssd300.data.voc import read_voc_split

        return read_voc_split(path)
    if fmt == "yolo":
        from ssd300.data.yolo import read_yolo_split

        return read_yolo_split(path)
    raise ValueError(f"{path}: COCO json has no column reader here (use load_annotations)")


def read_annotations(annotations: PathLike, cache_dir: Union[PathLike, None] = "auto") -> ParsedAnnotations:
    """An annotation source (module docstring) -> validated :class:`ParsedAnnotations`."""
    path = Path(annotations)
    if format_of_source(path) == "coco":
        return load_annotations(path, cache_dir=cache_dir)
    if not path.exists():
        raise UserInputError(f"{path}: annotation source does not exist")
    return read_columns(path).parsed()


def columns_to_coco(columns: SplitColumns) -> dict[str, Any]:
    """COCO instances dict of a split: boxes as float64 xywh exactly as read (unclipped).

    VOC ``difficult`` boxes become ``iscrowd: 1``: under the COCO metric a crowd box is an ignore
    region (a detection matching it is neither true nor false positive, it never counts as a miss),
    which is VOC's "ignored"; dropping them instead would turn every detection of a difficult object
    into a false positive. (COCO matches crowd boxes by intersection over the detection's area, a
    little more lenient than VOC's IoU.)
    """
    names = columns.file_names
    images = [{"id": int(i), "file_name": names[r], "width": int(w), "height": int(h)}
              for r, (i, (w, h)) in enumerate(zip(columns.image_ids.tolist(), columns.sizes.tolist()))]
    rows = [r for r, n in enumerate(columns.box_counts.tolist()) for _ in range(n)]
    image_ids = columns.image_ids.tolist()
    crowd = columns.difficult.tolist() if columns.difficult is not None else [False] * len(rows)
    annotations = []
    for k, ((left, top, right, bottom), category, row) in enumerate(
            zip(columns.boxes.tolist(), columns.category_ids.tolist(), rows)):
        w, h = right - left, bottom - top
        annotations.append({"id": k + 1, "image_id": image_ids[row], "category_id": int(category),
                            "bbox": [left, top, w, h], "area": w * h, "iscrowd": int(crowd[k])})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": int(c), "name": n} for c, n in columns.categories]}


def to_coco_dict(parsed: ParsedAnnotations) -> dict[str, Any]:
    """COCO instances dict of a flat index (boxes as stored: float32, clipped; difficult -> iscrowd)."""
    return columns_to_coco(SplitColumns.from_parsed(parsed))


def load_ground_truth(annotations: PathLike, backend: Optional[str] = None) -> Any:
    """The evaluation backend's COCO ground-truth object of an annotation source."""
    from ssd300.coco_eval import load_coco_ground_truth, resolve_eval_backend

    path = Path(annotations)
    if format_of_source(path) == "coco":
        return load_coco_ground_truth(path, backend=backend)
    data = columns_to_coco(read_columns(path))
    if resolve_eval_backend(backend) == "faster-coco-eval":
        from faster_coco_eval import COCO as FasterCOCO

        return FasterCOCO(data, print_function=lambda *_: None)
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
