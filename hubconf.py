"""torch.hub entry points, from a local checkout; weights from a local checkpoint file, or published ones.

``pretrained=True`` without ``checkpoint`` loads NVIDIA's COCO-trained SSD300 (``nvidia-ssd300-coco``,
:mod:`ssd300.weights`), downloaded once into the cache and verified, as the reference's hub entry
does; ``checkpoint`` also takes a published name or an http(s) URL.

Mirrors the reference's hub entry points::

    import torch
    repo = "/path/to/ssd300"            # this checkout
    model = torch.hub.load(repo, "nvidia_ssd", source="local", checkpoint="ssd300.pt")  # CUDA if available
    utils = torch.hub.load(repo, "nvidia_ssd_processing_utils", source="local", checkpoint="ssd300.pt")
    batch = utils.prepare_tensor([utils.prepare_input("photo.jpg")])   # on the model's device
    with torch.no_grad():
        detections = utils.decode_results(model(batch))        # per image: [boxes, classes, scores]
    best = [utils.pick_best(d, 0.40) for d in detections]
    names = utils.get_coco_object_dictionary()                 # the checkpoint's names: names[label - 1]

Model and tensors go to one device: ``device=None`` is the project's one rule (CUDA when
available, else the CPU) for both; pass the same ``device="cpu"``/``"cuda:1"`` to both to choose.

and adds our own:

    model = torch.hub.load(repo, "ssd300", source="local", checkpoint="ssd300.pt")
    detector = torch.hub.load(repo, "detector", source="local", checkpoint="ssd300.pt", device="cpu")
    result = detector("photo.jpg")    # boxes in pixels, scores, class names

Preprocessing is the project's single evaluation transform (resize to 300x300, ImageNet
normalisation), the one the models are trained with.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

dependencies = ["torch", "torchvision", "numpy", "PIL"]

# A fresh clone need not be pip-installed: make ``src/`` importable.
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "ssd300")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)


PRETRAINED = "nvidia-ssd300-coco"  # the reference's pretrained=True: NVIDIA's COCO checkpoint


def nvidia_ssd(pretrained: bool = True, checkpoint: Optional[str] = None, model_math: str = "fp32",
               backbone: str = "resnet50", num_classes: int = 81, device: Optional[str] = None, **kwargs: Any):
    """SSD300 (ResNet-50) as in the reference's ``nvidia_ssd``: returns the model in eval mode on
    ``device`` (None: CUDA when available, else the CPU: the device ``prepare_tensor`` uses too).

    ``checkpoint``: a checkpoint file, published name or URL (default with ``pretrained``: NVIDIA's
    COCO checkpoint, downloaded once). ``model_math="fp16"``
    returns a half-precision model, as the reference does. ``model.label_map`` holds the class
    names and category ids (``utils.get_coco_object_dictionary(model)`` lists the names).
    """
    import torch

    from ssd300.runtime import resolve_device

    target = resolve_device(device)
    model = ssd300(checkpoint=checkpoint, pretrained=pretrained, backbone=backbone,
                   num_classes=num_classes, **kwargs)
    if model_math == "fp16":
        model = model.half()
    elif model_math != "fp32":
        raise ValueError(f"model_math must be 'fp32' or 'fp16', got {model_math!r}")
    return model.to(target).eval() if isinstance(model, torch.nn.Module) else model


def ssd300(checkpoint: Optional[str] = None, pretrained: bool = True, backbone: str = "resnet50",
           num_classes: int = 81, map_location: str = "cpu", **kwargs: Any):
    """Our SSD300: from a checkpoint (file, published name, URL; default with ``pretrained``: NVIDIA's
    COCO one), or randomly initialised with ``pretrained=False``.

    ``backbone_path`` (a local torchvision ResNet state dict) may be passed for a fresh model.
    """
    from ssd300.checkpoint import load_model
    from ssd300.labels import LabelMap
    from ssd300.model import SSD300

    if checkpoint is None and pretrained:
        checkpoint = PRETRAINED
    if checkpoint is not None:
        model, label_map, _ = load_model(checkpoint, map_location=map_location)
        model.label_map = label_map  # the checkpoint's class names and category ids
        return model
    model = SSD300(backbone=backbone, num_classes=num_classes, backbone_path=kwargs.get("backbone_path")).eval()
    model.label_map = LabelMap.coco2017() if num_classes == 81 else LabelMap.generic(num_classes)
    return model


def detector(checkpoint: Optional[str] = None, device: Optional[str] = None, **options: Any):
    """:class:`ssd300.inference.Detector` for a checkpoint (default: NVIDIA's COCO one, downloaded
    once): images in, pixel boxes and names out."""
    from ssd300.inference import Detector

    return Detector.from_checkpoint(checkpoint or PRETRAINED, device=device, **options)


class Processing:
    """The reference's ``nvidia_ssd_processing_utils`` methods, on this project's modules.

    Differences from the reference, on purpose: images are read from local paths only, the
    preprocessing is the training/evaluation one (resize to 300x300, ImageNet mean/std) rather
    than the reference notebook's aspect-keeping rescale + centre crop with mean/std 128, and the
    class names come from the checkpoint (COCO's built in when none is given; nothing is
    downloaded). ``device`` (None: CUDA when available, else the CPU, as ``nvidia_ssd``) is where
    ``prepare_tensor`` puts the batch.
    """

    def __init__(self, label_map: Any = None, device: Optional[str] = None) -> None:
        from ssd300.labels import LabelMap
        from ssd300.runtime import resolve_device

        self.label_map = label_map if label_map is not None else LabelMap.coco2017()
        self.device = resolve_device(device)

    @staticmethod
    def load_image(image_path: str):
        """An RGB PIL image from a local file."""
        from ssd300.inference import load_rgb

        return load_rgb(image_path, draft=False)

    @staticmethod
    def prepare_input(img_uri: str):
        """A local image path -> a model-ready HWC float32 numpy array (300, 300, 3)."""
        from ssd300.data.transforms import EvalTransform

        return EvalTransform()(Processing.load_image(img_uri)).permute(1, 2, 0).numpy()

    def prepare_tensor(self, inputs, fp16: bool = False, device: Optional[str] = None):
        """A list of ``prepare_input`` arrays -> an NCHW tensor on ``device`` (default: the utils'
        device, the same rule as ``nvidia_ssd``'s, so model and batch meet)."""
        import numpy as np
        import torch

        from ssd300.runtime import resolve_device

        target = self.device if device is None else resolve_device(device)
        tensor = torch.from_numpy(np.stack([np.asarray(x, dtype=np.float32) for x in inputs])).permute(0, 3, 1, 2)
        tensor = tensor.contiguous().to(target)
        return tensor.half() if fp16 else tensor

    @staticmethod
    def decode_results(predictions, criteria: float = 0.5, max_output: int = 20):
        """``model(batch)`` -> per image ``[boxes (K,4) ltrb in [0,1], classes (K,), confidences (K,)]``
        as numpy arrays; classes are labels 1..80 (name = ``get_coco_object_dictionary()[c - 1]``)."""
        from ssd300.default_boxes import default_boxes_300
        from ssd300.postprocess import PostProcessor

        locs, logits = (p.float() for p in predictions)
        # The reference's signature: criteria is the NMS IoU, max_output the detections per image;
        # the other settings are PostprocessConfig's. Boxes come back clipped to the image.
        processor = PostProcessor(default_boxes_300(), iou_threshold=criteria, max_detections=max_output)
        return [[d.boxes.cpu().numpy(), d.labels.cpu().numpy(), d.scores.cpu().numpy()]
                for d in processor(locs, logits)]

    @staticmethod
    def pick_best(detections, threshold: float = 0.3):
        """The detections of one image scoring above ``threshold``."""
        import numpy as np

        best = np.flatnonzero(detections[2] > threshold)
        return [part[best] for part in detections]

    def get_coco_object_dictionary(self, model: Any = None):
        """The class names in label order (label 1 is ``[0]``): of ``model`` (one from
        ``nvidia_ssd``/``ssd300``) when given, else of the utils' checkpoint, else COCO's 80."""
        label_map = getattr(model, "label_map", None) or self.label_map
        return list(label_map.names[1:])


def nvidia_ssd_processing_utils(checkpoint: Optional[str] = None, device: Optional[str] = None):
    """The reference's processing utilities (same method names): see :class:`Processing`.

    ``checkpoint``: a local checkpoint whose class names ``get_coco_object_dictionary`` returns
    (default: COCO's). ``device``: where ``prepare_tensor`` puts batches (default as ``nvidia_ssd``).
    """
    label_map = None
    if checkpoint is not None:
        from ssd300.checkpoint import load_checkpoint, resolve_model_spec

        label_map = resolve_model_spec(load_checkpoint(checkpoint), source=f"checkpoint {checkpoint}").label_map
    return Processing(label_map, device)
