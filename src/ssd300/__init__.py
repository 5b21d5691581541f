"""SSD300 v1.1 object detector (ResNet backbones), faithful to NVIDIA's reference."""

__version__ = "0.1.0"
