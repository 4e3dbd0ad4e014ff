"""The classifier: a backbone from the registry plus the head from config."""

from __future__ import annotations

import keras

from carclassifier.backbones import build_backbone
from carclassifier.config import ModelConfig

BACKBONE_NAME = "backbone"


def build_classifier(config: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """Backbone (nested as one layer named ``backbone``) + pooling + optional dense layers
    (the recipe's idea of 1-2 more dense layers, each with batch norm and dropout) + softmax.

    The model takes raw RGB pixels in 0..255; each backbone normalizes inside. The backbone is
    called in inference mode, so its BatchNormalization statistics stay as pretrained when
    layers are unfrozen (the Keras fine-tuning guide's advice).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    backbone = build_backbone(config.backbone, image_size, config.weights)
    backbone.name = BACKBONE_NAME
    head = config.head
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = backbone(inputs, training=False)
    pool = (
        keras.layers.GlobalAveragePooling2D
        if head.pooling == "avg"
        else keras.layers.GlobalMaxPooling2D
    )
    x = pool(name="head_pool")(x)
    for i, units in enumerate(head.dense_units):
        x = keras.layers.Dense(units, use_bias=not head.batch_norm, name=f"head_dense_{i}")(x)
        if head.batch_norm:
            x = keras.layers.BatchNormalization(name=f"head_bn_{i}")(x)
        x = keras.layers.Activation("relu", name=f"head_relu_{i}")(x)
        x = keras.layers.Dropout(head.dropout, name=f"head_dropout_{i}")(x)
    x = keras.layers.Dropout(head.dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name=f"{config.backbone}_classifier")
