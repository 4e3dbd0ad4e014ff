"""Image backbones by name: keras.applications EfficientNets and offline EfficientNet-Lite0/1/2.

Every backbone takes raw RGB pixels in 0..255 (float) and normalizes them itself.
"""

from carclassifier.backbones.lite import (
    efficientnet_lite,
    efficientnet_lite0,
    efficientnet_lite1,
    efficientnet_lite2,
)
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
    "efficientnet_lite",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "get_backbone",
    "register_backbone",
]
