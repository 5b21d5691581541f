"""A dataset check before training (``ssd300 check-data``): what is in each split, and the
mistakes that hurt training or evaluation, in one typed report (:class:`DataReport`).

Everything is computed over the flat index (:class:`~ssd300.data.annotations.ParsedAnnotations`)
with numpy; images are not decoded. Files are touched three ways only: one ``stat`` per image
(missing files, and sizes for the duplicate search), a hash of the files that share their byte
size with another (duplicates and split overlap by content), and a header read (no pixels) for
the size/EXIF check, limited to ``header_checks`` images per split: 20,000 by default, which covers
a whole custom dataset (where phone photos with EXIF rotation come from) and keeps a COCO-sized
check within seconds; beyond it an evenly spaced sample is read and the report says so.

Severity: an ``error`` is a labelling or layout mistake (exit status 1); a ``warning`` may be
intended (images without boxes are negatives; a class missing from val only) and fails the
check only with ``strict``.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ssd300.data.annotations import ParsedAnnotations, parse_annotations, read_annotation_file
from ssd300.data.coco import ImageSizeMismatch, check_image_size
from ssd300.data.images import DECODE_ERRORS, exif_orientation, open_image
from ssd300.data.layouts import check_data_format, detect_format, find_split, read_columns
from ssd300.data.transforms import INPUT_SIZE
from ssd300.default_boxes import default_boxes_300
from ssd300.errors import UserInputError
from ssd300.files import PathLike

SPLITS: tuple[str, ...] = ("train", "val")
HEADER_CHECKS = 20_000
OUTSIDE_TOLERANCE = 1.0   # pixels a box may pass the image edge before it counts as outside (float rounding)
MAX_EXAMPLES = 5


def smallest_default_box() -> float:
    """Side (sqrt(w * h)) in input pixels of the smallest default box: 21 for SSD300."""
    xywh = default_boxes_300().xywh.double()
    return round(float((xywh[:, 2] * xywh[:, 3]).sqrt().min()) * INPUT_SIZE, 4)   # float32 storage: 20.9999997


@dataclass
class Finding:
    """One kind of problem: how many, and a few examples naming files."""

    kind: str
    severity: str            # "error" or "warning"
    count: int
    message: str
    examples: list[str] = field(default_factory=list)


@dataclass
class SplitReport:
    """What one split holds."""

    split: str
    annotation_file: str
    image_dir: str
    images: int
    boxes: int
    crowd_boxes: int
    difficult_boxes: int                 # VOC's difficult flag (counted in the boxes below)
    images_without_boxes: int
    class_boxes: dict[str, int]          # class name -> boxes (crowd excluded)
    class_images: dict[str, int]         # class name -> images with at least one such box
    size_edges: list[float]              # box side sqrt(w * h) at the 300x300 input: histogram edges
    size_counts: list[int]
    below_smallest_default: int          # boxes smaller than the smallest default box
    headers_checked: int


@dataclass
class DataReport:
    """The result of :func:`check_dataset`."""

    root: str
    data_format: str                     # the layout read: coco, voc or yolo
    smallest_default_box: float
    splits: list[SplitReport]
    findings: list[Finding]

    def problems(self, strict: bool = False) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" or strict]

    def exit_status(self, strict: bool = False) -> int:
        """0: clean; 1: a problem was found (errors; with ``strict`` warnings too)."""
        return 1 if self.problems(strict) else 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The report as text for a terminal."""
        lines = [f"dataset {self.root} ({self.data_format} layout)"]
        for s in self.splits:
            difficult = f", {s.difficult_boxes} difficult" if s.difficult_boxes else ""
            lines.append(f"  {s.split}: {s.images} images, {s.boxes} boxes ({s.crowd_boxes} crowd left out"
                         f"{difficult}), {s.images_without_boxes} images without boxes  [{s.annotation_file}]")
        names = list(dict.fromkeys(n for s in self.splits for n in s.class_boxes))
        if names:
            width = max(8, *(len(n) for n in names))
            header = f"  {'class':<{width}}" + "".join(f"  {s.split + ' boxes':>12}  {'images':>7}"
                                                        for s in self.splits)
            lines += ["", header]
            for name in names:
                lines.append(f"  {name:<{width}}" + "".join(
                    f"  {s.class_boxes.get(name, 0):>12}  {s.class_images.get(name, 0):>7}" for s in self.splits))
        lines += ["", f"  box side at the {INPUT_SIZE}x{INPUT_SIZE} input (smallest default box: "
                      f"{self.smallest_default_box:.0f} px)"]
        for s in self.splits:
            bins = "  ".join(f"{_bin_name(lo, hi)}: {n}" for lo, hi, n in
                             zip(s.size_edges[:-1], s.size_edges[1:], s.size_counts))
            share = s.below_smallest_default / s.boxes if s.boxes else 0.0
            lines.append(f"  {s.split}: {bins}  -> {s.below_smallest_default} boxes ({share:.1%}) smaller than "
                         "the smallest default box")
        lines.append("")
        if not self.findings:
            lines.append("  no problems found")
        for f in self.findings:
            lines.append(f"  {f.severity.upper():7} {f.kind}: {f.message}")
            lines += [f"            e.g. {e}" for e in f.examples]
        return "\n".join(lines)


def _bin_name(lo: float, hi: float) -> str:
    return f"<{hi:.0f}" if lo == 0 else f"{lo:.0f}-{hi:.0f}"


# ----------------------------------------------------------------------------- loading the splits


@dataclass
class _Split:
    name: str
    format: str
    image_dir: Path
    annotation_file: Path
    parsed: ParsedAnnotations
    outside: np.ndarray        # (A,) bool per annotation of the file: the box passes the image edge
    outside_examples: list[str]

    def file_name(self, row: int) -> str:
        start, end = self.parsed.name_offsets[row], self.parsed.name_offsets[row + 1]
        return self.parsed.name_bytes[start:end].tobytes().decode("utf-8", "surrogatepass")

    def paths(self) -> list[Path]:
        return [self.image_dir / self.file_name(r) for r in range(len(self.parsed.image_ids))]


def _outside(boxes_ltrb: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(B,) bool: the box passes its image's edge (``sizes`` (B, 2) width, height) by more than the tolerance."""
    t = OUTSIDE_TOLERANCE
    return np.asarray(((boxes_ltrb[:, :2] < -t) | (boxes_ltrb[:, 2:] > sizes + t)).any(axis=1))


def _read_split(root: Path, split: str, data_format: str) -> Optional[_Split]:
    """One split of the dataset, or None when the layout has no such split. The flat index clips
    boxes to the image, so whether they passed its edge is read from the unclipped source."""
    try:
        source = find_split(root, split, data_format)
    except UserInputError as err:
        if f"for split {split!r}" in str(err):
            return None
        raise
    where = source.annotations
    if source.format == "coco":
        data = read_annotation_file(where)
        parsed = parse_annotations(data, where)
        images = {img["id"]: (float(img["width"]), float(img["height"]), img["file_name"]) for img in data["images"]}
        anns = data["annotations"]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        wh = np.array([images[a["image_id"]][:2] for a in anns], dtype=np.float64).reshape(-1, 2)
        outside = _outside(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), wh)
        examples = [f"{where}: annotation {anns[i].get('id', i)} of {images[anns[i]['image_id']][2]}: "
                    f"bbox {anns[i]['bbox']} outside {wh[i, 0]:.0f}x{wh[i, 1]:.0f}"
                    for i in np.flatnonzero(outside)[:MAX_EXAMPLES]]
    else:
        columns = read_columns(where)
        parsed = columns.parsed()
        rows = np.repeat(np.arange(len(columns.image_ids)), columns.box_counts)
        wh = columns.sizes[rows].astype(np.float64).reshape(-1, 2)
        outside = _outside(columns.boxes.reshape(-1, 4), wh)
        def file_of(name: str) -> Path:   # the file that holds the image's boxes
            folder = source.image_dir.parent / "Annotations" if source.format == "voc" else Path(where)
            return folder / (Path(name).stem + (".xml" if source.format == "voc" else ".txt"))

        examples = [f"{file_of(columns.file_names[rows[i]])}: box {columns.boxes[i].round(2).tolist()} (ltrb) "
                    f"outside {wh[i, 0]:.0f}x{wh[i, 1]:.0f}" for i in np.flatnonzero(outside)[:MAX_EXAMPLES]]
    return _Split(split, source.format, source.image_dir, Path(where), parsed, outside, examples)


def _load_splits(root: Path, splits: Sequence[str], data_format: str) -> list[_Split]:
    check_data_format(data_format)
    if data_format == "auto":
        data_format = detect_format(root)   # no known layout: one line naming the folder
    loaded = [s for s in (_read_split(root, name, data_format) for name in splits) if s is not None]
    if not loaded:
        raise UserInputError(f"data {root}: no split of {', '.join(splits)} found in its {data_format} layout",
                             fields=("data",))
    return loaded


# ----------------------------------------------------------------------------- the checks


def check_dataset(root: PathLike, splits: Sequence[str] = SPLITS, *, data_format: str = "auto",
                  header_checks: Optional[int] = HEADER_CHECKS) -> DataReport:
    """Check the dataset folder ``root`` (its ``splits`` that exist) and return the report.

    ``data_format``: "auto" (detected from the folder, :func:`ssd300.data.layouts.detect_format`),
    "coco", "voc" or "yolo".

    ``header_checks``: images per split whose header is read for the size/EXIF check (``None``:
    all; 0: none). Raises UserInputError (field ``data``) when no split can be read.
    """
    root_path = Path(root).expanduser()
    loaded = _load_splits(root_path, splits, data_format)
    smallest = smallest_default_box()
    findings: list[Finding] = []
    reports = [_split_report(s, smallest, findings, header_checks) for s in loaded]
    _check_files(loaded, findings)
    if len(loaded) > 1:
        _check_classes_across(loaded, findings)
    order = {"error": 0, "warning": 1}
    findings.sort(key=lambda f: order[f.severity])
    return DataReport(str(root_path), loaded[0].format, smallest, reports, findings)


def _split_report(s: _Split, smallest: float, findings: list[Finding], header_checks: Optional[int]) -> SplitReport:
    p = s.parsed
    n = len(p.image_ids)
    counts = np.diff(p.box_offsets)
    row_of_box = np.repeat(np.arange(n), counts)
    boxes = p.boxes.astype(np.float64)
    wh = boxes[:, 2:] - boxes[:, :2]
    scale = INPUT_SIZE / p.sizes[row_of_box].astype(np.float64)      # the image is stretched to 300x300
    side = np.sqrt(np.clip(wh * scale, 0, None).prod(axis=1))
    # boxes are clipped to the image, so no side passes the input size (the last bin includes it)
    edges = [0.0, smallest / 4, smallest / 2, smallest, 2 * smallest, 4 * smallest, 8 * smallest, float(INPUT_SIZE)]
    size_counts = np.histogram(side, bins=edges)[0]
    names = dict(p.categories)
    ids = np.array([c for c, _ in p.categories], dtype=np.int64)
    order = np.argsort(ids)
    k = order[np.searchsorted(ids[order], p.category_ids)]             # category index of each box
    per_class = np.bincount(k, minlength=len(ids))
    images_per_class = np.bincount(np.unique(k * max(n, 1) + row_of_box) // max(n, 1), minlength=len(ids))
    class_boxes = {name: int(per_class[i]) for i, (_, name) in enumerate(p.categories)}
    class_images = {name: int(images_per_class[i]) for i, (_, name) in enumerate(p.categories)}
    tag = f"{s.name}: "

    def example_rows(rows: np.ndarray) -> list[str]:
        return [f"{s.image_dir / s.file_name(int(r))}" for r in rows[:MAX_EXAMPLES]]

    empty_rows = np.flatnonzero(counts == 0)
    if empty_rows.size:
        findings.append(Finding("images_without_boxes", "warning", int(empty_rows.size),
                                f"{tag}{empty_rows.size} images have no boxes (negatives in training; "
                                "intended?)", example_rows(empty_rows)))
    degenerate = np.flatnonzero((wh < 1).any(axis=1))
    if degenerate.size:
        findings.append(Finding("degenerate_boxes", "error", int(degenerate.size),
                                f"{tag}{degenerate.size} boxes are under 1 pixel wide or high inside the image "
                                "(training drops them)",
                                [f"{s.image_dir / s.file_name(int(row_of_box[i]))}: box {boxes[i].round(2).tolist()} "
                                 f"({names.get(int(p.category_ids[i]), '?')})" for i in degenerate[:MAX_EXAMPLES]]))
    if s.outside.any():
        findings.append(Finding("boxes_outside_image", "error", int(s.outside.sum()),
                                f"{tag}{int(s.outside.sum())} boxes pass the image edge by more than "
                                f"{OUTSIDE_TOLERANCE:g} px (clipped in training: wrong size or coordinates?)",
                                s.outside_examples))
    empty_classes = [name for name, count in class_boxes.items() if count == 0]
    if empty_classes:
        findings.append(Finding("empty_classes", "error" if s.name == "train" else "warning", len(empty_classes),
                                f"{tag}{len(empty_classes)} classes have no boxes: {', '.join(empty_classes)}"))
    checked = _check_headers(s, findings, header_checks)
    difficult = int(p.difficult.sum()) if p.difficult is not None else 0
    return SplitReport(s.name, str(s.annotation_file), str(s.image_dir), n, len(p.boxes), p.num_crowd, difficult,
                       int(empty_rows.size), class_boxes, class_images, edges, size_counts.tolist(),
                       int((side < smallest).sum()), checked)


def _check_headers(s: _Split, findings: list[Finding], limit: Optional[int]) -> int:
    """Read image headers (no pixels) and compare the size with the annotation's, as the dataset
    does (:func:`ssd300.data.coco.check_image_size`); EXIF-rotated mismatches are told apart."""
    n = len(s.parsed.image_ids)
    if limit is not None and limit <= 0:
        return 0
    rows = np.arange(n) if limit is None or n <= limit else np.linspace(0, n - 1, limit).round().astype(np.int64)
    rotated: list[str] = []
    other: list[str] = []
    unreadable: list[str] = []
    for row in rows.tolist():
        path = s.image_dir / s.file_name(row)
        width, height = (int(v) for v in s.parsed.sizes[row])
        try:
            with open_image(path) as image:
                try:
                    check_image_size(image, width, height)
                except ImageSizeMismatch as err:
                    (rotated if exif_orientation(image) in (5, 6, 7, 8) else other).append(f"{path}: {err}")
        except FileNotFoundError:
            continue  # counted by the file check
        except DECODE_ERRORS as err:
            unreadable.append(f"{path}: {err}")
    sampled = "" if len(rows) == n else f" (of {len(rows)} sampled images)"
    for kind, items, what in (("exif_rotated_size_mismatch", rotated, "are EXIF-rotated and their size disagrees "
                               "with the annotation (labelled as displayed?)"),
                              ("size_mismatch", other, "have another size than the annotation gives"),
                              ("unreadable_images", unreadable, "cannot be read as images")):
        if items:
            findings.append(Finding(kind, "error", len(items), f"{s.name}: {len(items)} images {what}{sampled}",
                                    items[:MAX_EXAMPLES]))
    return len(rows)


def _hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_files(splits: Sequence[_Split], findings: list[Finding]) -> None:
    """Missing files; duplicates by content (same size first, then a hash) within and across
    splits; one file listed in two splits; the same file name in two splits' folders."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    owner: dict[Path, tuple[str, Path]] = {}
    listed_twice: list[list[tuple[str, Path]]] = []
    for s in splits:
        missing = []
        for path in s.paths():
            try:
                size = os.stat(path).st_size
            except OSError:
                missing.append(path)
                continue
            key = path.resolve()
            if key in owner:   # one file listed twice: within a split or in two splits sharing a folder
                listed_twice.append([owner[key], (s.name, path)])
                continue
            owner[key] = (s.name, path)
            by_size[size].append((s.name, path))
        if missing:
            findings.append(Finding("missing_images", "error", len(missing),
                                    f"{s.name}: {len(missing)} images listed in {s.annotation_file.name} are not in "
                                    f"{s.image_dir}", [str(p) for p in missing[:MAX_EXAMPLES]]))
    by_hash: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for group in by_size.values():
        if len(group) > 1:
            for split, path in group:
                by_hash[_hash(path)].append((split, path))
    groups = [g for g in by_hash.values() if len(g) > 1] + listed_twice
    within = [g for g in groups if len({split for split, _ in g}) == 1]
    across = [g for g in groups if len({split for split, _ in g}) > 1]
    if within:
        count = sum(len(g) - 1 for g in within)
        findings.append(Finding("duplicate_images", "error", count,
                                f"{count} images are byte-identical copies of another image of their split (or "
                                "the same file listed twice)",
                                [" = ".join(str(p) for _, p in g) for g in within[:MAX_EXAMPLES]]))
    if across:
        findings.append(Finding("split_overlap", "error", len(across),
                                f"{len(across)} images are in more than one split (same bytes or the same file): "
                                "evaluation scores images the model trained on",
                                [" = ".join(f"{p} ({split})" for split, p in g) for g in across[:MAX_EXAMPLES]]))
    if len(splits) > 1:
        same_file = {p.name for g in across for _, p in g}
        names = [{s.file_name(r) for r in range(len(s.parsed.image_ids))} for s in splits]
        shared = sorted(set.intersection(*names) - same_file)
        if shared:
            findings.append(Finding("split_overlap_names", "warning", len(shared),
                                    f"{len(shared)} file names appear in {' and '.join(s.name for s in splits)} "
                                    "with different content (re-encoded copies, or names reused per folder?)",
                                    shared[:MAX_EXAMPLES]))


def _check_classes_across(splits: Sequence[_Split], findings: list[Finding]) -> None:
    """The splits must share one category list (the label map comes from it), and a class seen in
    evaluation must have been seen in training."""
    first = splits[0]
    for other in splits[1:]:
        a, b = set(first.parsed.categories), set(other.parsed.categories)
        if a != b:
            only_a = ", ".join(f"{n} (id {c})" for c, n in sorted(a - b)) or "-"
            only_b = ", ".join(f"{n} (id {c})" for c, n in sorted(b - a)) or "-"
            findings.append(Finding("class_mismatch", "error", len(a ^ b),
                                    f"categories differ between {first.name} and {other.name}: only in "
                                    f"{first.name}: {only_a}; only in {other.name}: {only_b}",
                                    [str(first.annotation_file), str(other.annotation_file)]))
        used_a = set(first.parsed.category_order.tolist())
        unseen = [n for c, n in other.parsed.categories if c in set(other.parsed.category_order.tolist()) - used_a]
        if unseen:
            findings.append(Finding("class_unseen_in_training", "error", len(unseen),
                                    f"{len(unseen)} classes have boxes in {other.name} but none in {first.name}: "
                                    f"{', '.join(unseen)}"))


# ----------------------------------------------------------------------------- the figure


def plot_report(report: DataReport, path: PathLike) -> Path:
    """Box-side histogram (with the smallest default box) and per-class box counts, as one PNG."""
    from matplotlib.figure import Figure

    from ssd300.files import atomic_write

    names = list(dict.fromkeys(n for s in report.splits for n in s.class_boxes))
    fig = Figure(figsize=(12, max(4.0, 0.25 * len(names) + 1.5)))
    hist, bars = fig.subplots(1, 2)
    width = 0.8 / max(1, len(report.splits))
    for k, s in enumerate(report.splits):
        x = np.arange(len(s.size_counts)) + k * width
        hist.bar(x, s.size_counts, width=width, label=s.split)
        positions = np.arange(len(names)) + k * width
        bars.barh(positions, [s.class_boxes.get(n, 0) for n in names], height=width, label=s.split)
    labels = [_bin_name(lo, hi) for lo, hi in zip(report.splits[0].size_edges[:-1], report.splits[0].size_edges[1:])]
    hist.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    hist.axvline(2.5 + 0.4 - width / 2, color="red", linestyle="--",
                 label=f"smallest default box ({report.smallest_default_box:.0f} px)")
    hist.set_xlabel(f"box side sqrt(w*h) at the {INPUT_SIZE}x{INPUT_SIZE} input (px)")
    hist.set_ylabel("boxes")
    hist.legend(loc="best", fontsize="small")
    bars.set_yticks(np.arange(len(names)) + 0.4 - width / 2, names)
    bars.invert_yaxis()
    bars.set_xlabel("boxes per class")
    bars.legend()
    fig.suptitle(f"check-data: {report.root}")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    return path
