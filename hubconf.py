"""torch.hub entry points, from a local checkout and local checkpoint files only (nothing is downloaded).

Mirrors the reference's hub entry points::

    import torch
    repo = "/path/to/ssd300"            # this checkout
    model = torch.hub.load(repo, "nvidia_ssd", source="local", checkpoint="ssd300.pt")
    utils = torch.hub.load(repo, "nvidia_ssd_processing_utils", source="local")
    batch = utils.prepare_tensor([utils.prepare_input("photo.jpg")])
    with torch.no_grad():
        detections = utils.decode_results(model(batch))        # per image: [boxes, classes, scores]
    best = [utils.pick_best(d, 0.40) for d in detections]
    names = utils.get_coco_object_dictionary()                 # names[label - 1]

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


def _no_download(entry: str) -> Exception:
    from ssd300.errors import UserInputError

    return UserInputError(
        f"{entry}: this hub repository never downloads weights; pass checkpoint=<path to an SSD300 "
        "checkpoint> (ours or NVIDIA's reference), or pretrained=False for a randomly initialised model"
    )


def nvidia_ssd(pretrained: bool = True, checkpoint: Optional[str] = None, model_math: str = "fp32",
               backbone: str = "resnet50", num_classes: int = 81, **kwargs: Any):
    """SSD300 (ResNet-50) as in the reference's ``nvidia_ssd``: returns the model in eval mode.

    ``checkpoint``: a local checkpoint file (required when ``pretrained``). ``model_math="fp16"``
    returns a half-precision model, as the reference does.
    """
    import torch

    if checkpoint is None and pretrained:
        raise _no_download("nvidia_ssd")
    model = ssd300(checkpoint=checkpoint, pretrained=pretrained, backbone=backbone,
                   num_classes=num_classes, **kwargs)
    if model_math == "fp16":
        model = model.half()
    elif model_math != "fp32":
        raise ValueError(f"model_math must be 'fp32' or 'fp16', got {model_math!r}")
    return model.eval() if isinstance(model, torch.nn.Module) else model


def ssd300(checkpoint: Optional[str] = None, pretrained: bool = True, backbone: str = "resnet50",
           num_classes: int = 81, map_location: str = "cpu", **kwargs: Any):
    """Our SSD300: from a local checkpoint, or randomly initialised with ``pretrained=False``.

    ``backbone_path`` (a local torchvision ResNet state dict) may be passed for a fresh model.
    """
    from ssd300.checkpoint import load_model
    from ssd300.model import SSD300

    if checkpoint is not None:
        model, _, _ = load_model(checkpoint, map_location=map_location)
        return model
    if pretrained:
        raise _no_download("ssd300")
    return SSD300(backbone=backbone, num_classes=num_classes, backbone_path=kwargs.get("backbone_path")).eval()


def detector(checkpoint: Optional[str] = None, device: Optional[str] = None, **options: Any):
    """:class:`ssd300.inference.Detector` for a local checkpoint: images in, pixel boxes and names out."""
    from ssd300.inference import Detector

    if checkpoint is None:
        raise _no_download("detector")
    return Detector.from_checkpoint(checkpoint, device=device, **options)


class Processing:
    """The reference's ``nvidia_ssd_processing_utils`` methods, on this project's modules.

    Differences from the reference, on purpose: images are read from local paths only, the
    preprocessing is the training/evaluation one (resize to 300x300, ImageNet mean/std) rather
    than the reference notebook's aspect-keeping rescale + centre crop with mean/std 128, and the
    COCO class names are built in (nothing is downloaded).
    """

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

    @staticmethod
    def prepare_tensor(inputs, fp16: bool = False):
        """A list of ``prepare_input`` arrays -> an NCHW tensor (on the GPU when there is one)."""
        import numpy as np
        import torch

        tensor = torch.from_numpy(np.stack([np.asarray(x, dtype=np.float32) for x in inputs])).permute(0, 3, 1, 2)
        tensor = tensor.contiguous().to("cuda" if torch.cuda.is_available() else "cpu")
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

    @staticmethod
    def get_coco_object_dictionary():
        """The 80 COCO class names in label order (label 1 is ``[0]``)."""
        from ssd300.labels import LabelMap

        return list(LabelMap.coco2017().names[1:])


def nvidia_ssd_processing_utils():
    """The reference's processing utilities (same method names): see :class:`Processing`."""
    return Processing()
