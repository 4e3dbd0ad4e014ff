"""The classifier: a backbone from the registry plus the head from config."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import keras

from carclassifier import storage
from carclassifier.backbones import build_backbone
from carclassifier.config import ModelConfig

BACKBONE_NAME = "backbone"


def load_model(uri: str, compile: bool = False) -> keras.Model:
    """Load a ``.keras`` model from a local path or gs:// URI (never unpickles: safe_mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.get_file(uri, Path(tmp) / "model.keras")
        return keras.models.load_model(local, compile=compile, safe_mode=True)


def build_classifier(config: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    """Backbone (nested as one layer named ``backbone``) + pooling + optional dense layers
    (the recipe's idea of 1-2 more dense layers, each with batch norm and dropout) + softmax.

    The model takes raw RGB pixels in 0..255; each backbone normalizes inside. Which backbone
    layers train is set per stage by `set_trainable`; frozen BatchNormalization layers run in
    inference mode (Keras 3), so their statistics stay as pretrained when blocks are unfrozen.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    backbone = build_backbone(config.backbone, image_size, config.weights)
    backbone.name = BACKBONE_NAME
    head = config.head
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = backbone(inputs)
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


_BLOCK = re.compile(r"^block(\d+[a-z])_")


def backbone_blocks(backbone: keras.Model) -> tuple[list, list[list], list]:
    """Split a backbone's layers into (stem layers, blocks in order, top layers).

    Blocks are keras.applications' ``block<N><letter>_*`` groups, which the Lite0 port uses too.
    """
    stem: list = []
    blocks: dict[str, list] = {}
    top: list = []
    for layer in backbone.layers:
        match = _BLOCK.match(layer.name)
        if match:
            blocks.setdefault(match.group(1), []).append(layer)
        elif blocks:
            top.append(layer)
        else:
            stem.append(layer)
    if not blocks:
        raise ValueError(f"{backbone.name} has no block<N><letter>_ layers to unfreeze by block")
    return stem, list(blocks.values()), top


def set_trainable(model: keras.Model, fraction: float, train_batchnorm: bool = False) -> dict:
    """Train the head plus the top ``fraction`` of the backbone's blocks (whole blocks,
    rounded up; the stem only at 1.0). BatchNormalization layers stay frozen unless
    ``train_batchnorm``. Returns counts for the logs."""
    backbone = model.get_layer(BACKBONE_NAME)
    stem, blocks, top = backbone_blocks(backbone)
    unfrozen = math.ceil(fraction * len(blocks)) if fraction > 0 else 0
    backbone.trainable = unfrozen > 0
    if unfrozen:
        trainable_layers = [
            *top,
            *(layer for block in blocks[len(blocks) - unfrozen :] for layer in block),
        ]
        if fraction >= 1.0:
            trainable_layers += stem
        chosen = {id(layer) for layer in trainable_layers}
        for layer in backbone.layers:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = id(layer) in chosen and (train_batchnorm or not is_bn)
    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    return {
        "blocks_total": len(blocks),
        "blocks_unfrozen": unfrozen,
        "trainable_weights": len(model.trainable_weights),
        "trainable_params": int(sum(math.prod(w.shape) for w in model.trainable_weights)),
    }
