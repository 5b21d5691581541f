"""Data: COCO-format datasets, SSD augmentation, loaders (PyTorch and DALI), synthetic data.

Submodules are imported on use (``from ssd300.data.coco import CocoDetection``) so that the
optional DALI dependency is only loaded by ``ssd300.data.dali``.
"""
