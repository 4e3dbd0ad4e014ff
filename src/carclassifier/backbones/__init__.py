"""Image backbones by name: keras.applications EfficientNets and an offline EfficientNet-Lite0.

Every backbone takes raw RGB pixels in 0..255 (float) and normalizes them itself.
"""

from carclassifier.backbones.lite0 import efficientnet_lite0
from carclassifier.backbones.registry import (
    BackboneSpec,
    available_backbones,
    build_backbone,
    get_backbone,
    register_backbone,
)

__all__ = [
    "BackboneSpec",
    "available_backbones",
    "build_backbone",
    "efficientnet_lite0",
    "get_backbone",
    "register_backbone",
]
