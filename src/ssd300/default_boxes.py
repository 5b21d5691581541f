"""The 8732 default boxes (anchors) of SSD300 and the variances used to encode offsets.

Order, sizes and clamping follow the reference exactly (SPEC §2): for each feature level, for each
box size, for each row, for each column. Note that the reference divides by ``fk = 300 / step``
(e.g. 37.5 for the 38x38 map), not by the feature size; we keep that.

Values are computed in float64 (as Python floats, like the reference), stored as float32, clamped
to [0, 1] in (cx, cy, w, h) form, and the ltrb form is derived from the clamped float32 xywh.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch


@dataclass(frozen=True)
class DefaultBoxesConfig:
    """Geometry of the default boxes; the defaults are SSD300 v1.1's (SPEC §2)."""

    figure_size: int = 300
    feature_sizes: tuple[int, ...] = (38, 19, 10, 5, 3, 1)
    steps: tuple[int, ...] = (8, 16, 32, 64, 100, 300)
    scales: tuple[int, ...] = (21, 45, 99, 153, 207, 261, 315)
    aspect_ratios: tuple[tuple[int, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    scale_xy: float = 0.1
    scale_wh: float = 0.2

    def __post_init__(self) -> None:
        levels = len(self.feature_sizes)
        if not (len(self.steps) == len(self.aspect_ratios) == levels and len(self.scales) == levels + 1):
            raise ValueError(
                "feature_sizes, steps and aspect_ratios need one entry per level and scales one more"
            )

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Default boxes per feature-map cell: 2 squares + 2 per aspect ratio."""
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    @property
    def num_boxes(self) -> int:
        return sum(n * size * size for n, size in zip(self.boxes_per_location, self.feature_sizes))


def _level_sizes(config: DefaultBoxesConfig, level: int) -> list[tuple[float, float]]:
    """(w, h) of every box shape of one level, in the reference's order."""
    sk = config.scales[level] / config.figure_size
    sk_next = config.scales[level + 1] / config.figure_size
    middle = math.sqrt(sk * sk_next)
    sizes = [(sk, sk), (middle, middle)]
    for ratio in config.aspect_ratios[level]:
        root = math.sqrt(ratio)
        sizes.append((sk * root, sk / root))
        sizes.append((sk / root, sk * root))
    return sizes


def _build_xywh(config: DefaultBoxesConfig) -> torch.Tensor:
    boxes: list[tuple[float, float, float, float]] = []
    for level, feature_size in enumerate(config.feature_sizes):
        fk = config.figure_size / config.steps[level]
        for w, h in _level_sizes(config, level):
            for row, col in itertools.product(range(feature_size), repeat=2):
                boxes.append(((col + 0.5) / fk, (row + 0.5) / fk, w, h))
    return torch.tensor(boxes, dtype=torch.float32).clamp_(0.0, 1.0)


def xywh_to_ltrb(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> (..., 4) left/top/right/bottom boxes."""
    xy, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat((xy - 0.5 * wh, xy + 0.5 * wh), dim=-1)


def ltrb_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) left/top/right/bottom boxes -> (..., 4) centre/size boxes."""
    lt, rb = boxes[..., :2], boxes[..., 2:]
    return torch.cat((0.5 * (lt + rb), rb - lt), dim=-1)


@dataclass(frozen=True, eq=False)
class DefaultBoxes:
    """The default boxes as ``xywh`` and ``ltrb`` (A, 4) float32 tensors on one device.

    ``to(device)`` is cheap: copies are made once per device and cached, so hot paths may call it
    on every batch.
    """

    config: DefaultBoxesConfig
    xywh: torch.Tensor
    ltrb: torch.Tensor
    _copies: dict = field(default_factory=dict, repr=False, compare=False)
    _columns: dict = field(default_factory=dict, repr=False, compare=False)

    def ltrb_columns(self) -> torch.Tensor:
        """``ltrb`` coordinate-major, (4, A) contiguous (cached)."""
        if "ltrb" not in self._columns:
            self._columns["ltrb"] = self.ltrb.t().contiguous()
        return self._columns["ltrb"]

    @classmethod
    def build(cls, config: DefaultBoxesConfig = DefaultBoxesConfig()) -> "DefaultBoxes":
        xywh = _build_xywh(config)
        return cls(config=config, xywh=xywh, ltrb=xywh_to_ltrb(xywh))

    @property
    def scale_xy(self) -> float:
        return self.config.scale_xy

    @property
    def scale_wh(self) -> float:
        return self.config.scale_wh

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        return self.config.boxes_per_location

    @property
    def num_boxes(self) -> int:
        return self.xywh.shape[0]

    @property
    def device(self) -> torch.device:
        return self.xywh.device

    def __len__(self) -> int:
        return self.num_boxes

    def to(self, device: torch.device | str) -> "DefaultBoxes":
        """This set of boxes on ``device`` (cached, so repeated calls do not copy)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        # One cache shared by every copy, so moving back and forth never copies again.
        self._copies.setdefault(self.device, self)
        copy = self._copies.get(device)
        if copy is None:
            copy = DefaultBoxes(
                config=self.config,
                xywh=self.xywh.to(device),
                ltrb=self.ltrb.to(device),
                _copies=self._copies,
            )
            self._copies[device] = copy
        return copy


@lru_cache(maxsize=None)
def default_boxes_300() -> DefaultBoxes:
    """SSD300 v1.1's 8732 default boxes on the CPU (built once per process)."""
    return DefaultBoxes.build(DefaultBoxesConfig())
