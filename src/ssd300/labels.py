"""Mapping between contiguous training labels (0 = background, 1..K) and dataset category ids.

The reference stores ``label_map`` in its checkpoints as ``{label: class name}`` with 0 being
"background"; the COCO category id of a label is then implied by the order of the dataset's
categories. We store the same ``label_map`` (so reference tools read our checkpoints) and an
explicit ``category_ids`` so that custom datasets with arbitrary ids map back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

BACKGROUND = "background"
# Category names that mean "no object" (labelme's COCO export lists ``_background_`` with id 0).
BACKGROUND_NAMES = frozenset({"background", "_background_", "__background__"})

# COCO 2017 detection categories (id, name), in the order of the official annotation files.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)


def is_background_category(category_id: int, name: str) -> bool:
    """A dataset category that is the background, not an object class: id 0 (label 0 is the
    background, and labelme exports it as id 0) or a name in :data:`BACKGROUND_NAMES` (any case)."""
    return int(category_id) == 0 or str(name).strip().lower() in BACKGROUND_NAMES


@dataclass(frozen=True)
class LabelMap:
    """Contiguous labels <-> category ids and names. Index 0 is the background class."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.category_ids):
            raise ValueError("names and category_ids must have the same length")
        if len(self.names) < 2:
            raise ValueError("a label map needs the background class and at least one class")

    @property
    def num_classes(self) -> int:
        """Number of classes including background (the model's C)."""
        return len(self.names)

    @classmethod
    def from_categories(cls, categories: Iterable[tuple[int, str]]) -> "LabelMap":
        """Labels 1..K follow the given order of (category id, name) pairs."""
        pairs = list(categories)
        ids = [int(cid) for cid, _ in pairs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids: {sorted(ids)}")
        return cls((BACKGROUND, *(str(n) for _, n in pairs)), (0, *ids))

    @classmethod
    def coco2017(cls) -> "LabelMap":
        return cls.from_categories(COCO_CATEGORIES)

    @classmethod
    def generic(cls, num_classes: int) -> "LabelMap":
        """Names ``class_<i>`` and category id = label, when nothing better is known."""
        return cls((BACKGROUND, *(f"class_{i}" for i in range(1, num_classes))), tuple(range(num_classes)))

    def names_by_category_id(self) -> dict[int, str]:
        """{category id: class name} of the object classes (background excluded)."""
        return dict(zip(self.category_ids[1:], self.names[1:]))

    def category_id_to_label(self) -> dict[int, int]:
        return {cid: label for label, cid in enumerate(self.category_ids) if label > 0}

    def labels_to_category_ids(self, labels: torch.Tensor) -> torch.Tensor:
        lut = torch.tensor(self.category_ids, dtype=torch.int64, device=labels.device)
        return lut[labels.long()]

    def to_checkpoint(self) -> dict[str, dict[int, Any]]:
        """The reference's ``label_map`` ({label: name}) plus our explicit ``category_ids``."""
        return {
            "label_map": dict(enumerate(self.names)),
            "category_ids": dict(enumerate(self.category_ids)),
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], num_classes: int | None = None) -> "LabelMap":
        """Rebuild from a checkpoint dict (ours or the reference's).

        Reference checkpoints have only ``label_map`` = {label: name}; if those names are COCO's,
        the COCO ids are used, else category id = label.
        """
        names_by_label = checkpoint.get("label_map")
        ids_by_label = checkpoint.get("category_ids")
        if not names_by_label:
            if num_classes is None:
                raise ValueError("checkpoint has no label_map and the number of classes is unknown")
            if num_classes == len(COCO_CATEGORIES) + 1:
                return cls.coco2017()
            return cls.generic(num_classes)
        labels = sorted(int(k) for k in names_by_label)
        if labels != list(range(len(labels))) and labels != list(range(1, len(labels) + 1)):
            raise ValueError(f"checkpoint label_map keys are not contiguous labels: {labels[:10]}...")
        names: Sequence[str] = [str(names_by_label.get(i, names_by_label.get(str(i), BACKGROUND)))
                                for i in range(max(labels) + 1)]
        if ids_by_label:
            ids = [int(ids_by_label.get(i, ids_by_label.get(str(i), 0))) for i in range(len(names))]
        else:
            coco_ids = {name: cid for cid, name in COCO_CATEGORIES}
            if all(n in coco_ids for n in names[1:]):
                ids = [0, *(coco_ids[n] for n in names[1:])]
            else:
                ids = list(range(len(names)))
        names = [BACKGROUND, *names[1:]]
        if num_classes is not None and len(names) != num_classes:
            raise ValueError(f"checkpoint label_map has {len(names)} classes but the model has {num_classes}")
        return cls(tuple(names), tuple(ids))


def category_mismatch(model: LabelMap, data: LabelMap, *, subset_ok: bool = False) -> str | None:
    """The first difference between a model's categories and a dataset's, in words; None if none.

    Names are compared case-insensitively. ``subset_ok``: the dataset may lack some of the model's
    categories (evaluating a COCO model on a person-only split); training needs the same labels in
    the same order, since label ``i`` of the weights is the dataset's ``i``-th category.
    """
    model_names, data_names = model.names_by_category_id(), data.names_by_category_id()
    for cid, name in data_names.items():
        if cid not in model_names:
            return f"category id {cid} ({name!r}) of the dataset is not in the checkpoint"
        if model_names[cid].strip().lower() != name.strip().lower():
            return f"category id {cid} is {model_names[cid]!r} in the checkpoint but {name!r} in the dataset"
    if subset_ok:
        return None
    for cid, name in model_names.items():
        if cid not in data_names:
            return f"category id {cid} ({name!r}) of the checkpoint is not in the dataset"
    if model.category_ids != data.category_ids:
        return "the same categories in another order (labels would not match the weights)"
    return None
