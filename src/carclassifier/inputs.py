"""Input pipelines: an ImageDataAugmentor-compatible generator and a tf.data pipeline.

Both decode with the same `load_image`, apply the same albumentations transform and produce
the same batches (float32 images in 0..255 unless ``preprocess_input``/``rescale`` say otherwise,
labels one-hot or sparse), so a config switch between them changes speed, not results.

The recipe fed Keras from ``ImageDataAugmentor`` (mjkvaak/ImageDataAugmentor). That package is
not on PyPI and does not work with Keras 3, so `ImageDataAugmentor` here re-creates its interface
on top of `keras.utils.PyDataset`::

    gen = ImageDataAugmentor(augment=train_transform(cfg.augment, 224), rescale=None)
    train = gen.flow_from_dataframe(df, directory=root, x_col="path", y_col="class_name",
                                    target_size=(224, 224), batch_size=16, class_mode="categorical")
    model.fit(train, ...)
"""

from __future__ import annotations

import copy
import logging
import math
import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from carclassifier.augment import train_transform, val_transform
from carclassifier.config import RunConfig
from carclassifier.data import is_image_name, load_image
from carclassifier.sources import sampling_weights

log = logging.getLogger(__name__)

ClassMode = Literal["categorical", "sparse", "raw"]
Transform = Callable[..., dict[str, Any]]


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of example ``index`` (its row in the frame) in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


def epoch_order(
    n: int, seed: int, epoch: int, shuffle: bool = True, weights: np.ndarray | None = None
) -> np.ndarray:
    """The order of the ``n`` examples in ``epoch``: a permutation seeded by (seed, epoch).

    ``weights`` (one per example, e.g. `carclassifier.sources.sampling_weights`): instead, ``n``
    draws with replacement, example ``i`` with probability ``weights[i] / sum(weights)``, seeded
    the same way (an epoch keeps its length; a photo of weight 2 comes twice as often as one of
    weight 1). None or all-equal weights give the plain permutation, bit for bit.
    """
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch])
    if weights is None:
        return rng.permutation(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be {n} finite values > 0, got shape {w.shape}")
    if np.all(w == w[0]):
        return rng.permutation(n)
    return rng.choice(n, size=n, replace=True, p=w / w.sum())


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one epoch of ``n`` examples (the last one may be short): ``steps_per_epoch``."""
    return math.ceil(n / batch_size)


class ExampleMaker:
    """Turns a path into a model-ready float32 image: decode, augment, preprocess, rescale.

    With a ``seed`` the augmentation draws from its own generators seeded by it (see
    `example_seed`), on a per-thread copy of the transform, so an example's pixels depend on
    (seed, epoch, index) only, never on which worker made it or in which order.
    """

    def __init__(
        self,
        target_size: tuple[int, int],
        augment: Transform | None = None,
        preprocess_input: Callable[[np.ndarray], np.ndarray] | None = None,
        rescale: float | None = None,
    ) -> None:
        self.target_size = tuple(target_size)
        self.augment = augment
        self.preprocess_input = preprocess_input
        self.rescale = rescale
        self._local = threading.local()

    def _thread_augment(self) -> Transform:
        augment = getattr(self._local, "augment", None)
        if augment is None:
            augment = self._local.augment = copy.deepcopy(self.augment)
        return augment

    @property
    def casts_only(self) -> bool:
        """True when the model-ready image is the augmented uint8 image as float32, unchanged."""
        return self.preprocess_input is None and not self.rescale

    def augmented(self, image: np.ndarray, seed: int | None = None) -> np.ndarray:
        """The augmented image (uint8), seeded when ``seed`` is given."""
        if self.augment is None:
            return image
        if seed is None:
            return self.augment(image=image)["image"]
        augment = self._thread_augment()
        augment.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return augment(image=image)["image"]

    def finish(self, image: np.ndarray, seed: int | None = None) -> np.ndarray:
        """Augment (seeded when ``seed`` is given), preprocess and rescale a decoded image."""
        x = self.augmented(image, seed).astype(np.float32)
        if self.preprocess_input is not None:
            x = np.asarray(self.preprocess_input(x), dtype=np.float32)
        if self.rescale:
            x = x * np.float32(self.rescale)
        return x

    def __call__(self, path: str | Path, seed: int | None = None) -> np.ndarray:
        return self.finish(load_image(path, self.target_size), seed)


class Examples:
    """The images of a fixed list of files, decoded at the target size, optionally kept in memory.

    The cache holds exactly what `load_image` returns (uint8, before augmentation), so a cached
    epoch has the same pixels as an uncached one; epochs after the first skip JPEG decoding.
    """

    def __init__(self, filepaths: Sequence[str], maker: ExampleMaker, cache: bool = False) -> None:
        self.filepaths = list(filepaths)
        self.maker = maker
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.filepaths)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds once every image is in it."""
        height, width = self.maker.target_size
        return len(self.filepaths) * height * width * 3

    def decoded(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 RGB at the target size (from the cache when there)."""
        if self.cache is None:
            return load_image(self.filepaths[index], self.maker.target_size)
        image = self.cache.get(index)
        if image is None:
            image = self.cache[index] = load_image(self.filepaths[index], self.maker.target_size)
        return image

    def batch(
        self, indices: Sequence[int], epoch: int, seed: int | None, raw: bool = False
    ) -> np.ndarray:
        """Model-ready images of ``indices`` in ``epoch``, augmentation seeded per example when
        ``seed`` is given; ``raw``: the augmented uint8 images (when `ExampleMaker.casts_only`,
        the caller casts them, e.g. inside the tf.data graph)."""
        make = self.maker.augmented if raw else self.maker.finish
        return np.stack(
            [
                make(self.decoded(int(i)), None if seed is None else example_seed(seed, epoch, i))
                for i in indices
            ]
        )


def encode_labels(labels: np.ndarray, num_classes: int, class_mode: ClassMode) -> np.ndarray:
    """Labels as the model wants them: one-hot (categorical), int (sparse) or as given (raw)."""
    if class_mode == "categorical":
        return np.eye(num_classes, dtype=np.float32)[labels.astype(int)]
    if class_mode == "sparse":
        return labels.astype(np.int32)
    return labels


def use_cache(config: RunConfig, n_images: int) -> bool:
    """Whether a pipeline over ``n_images`` keeps decoded images in memory (``input.cache``:
    memory, off, or auto = when ``n_images`` at the input size fit in ``cache_budget_mb``)."""
    mode = config.input.cache
    if mode != "auto":
        return mode == "memory"
    return cache_megabytes(n_images, config.input.image_size) <= config.input.cache_budget_mb


def cache_megabytes(n_images: int, image_size: int) -> float:
    """Memory the decoded-image cache needs: uint8 RGB at the input size."""
    return n_images * image_size * image_size * 3 / 2**20


class DataFrameIterator(keras.utils.PyDataset):
    """Batches of (images, labels) from a dataframe; what `ImageDataAugmentor.flow_*` returns.

    Epoch ``e`` (counted from ``initial_epoch``, advanced by ``on_epoch_end``) is a function of
    (seed, e) only: order `epoch_order`, augmentation seeded per example by `example_seed`.
    ``initial_step``: the first epoch starts at that batch (a resumed mid-epoch checkpoint); its
    batches are the uninterrupted epoch's from there on, and nothing before is made.
    ``weights``: per-example draw weights (`epoch_order`).
    """

    def __init__(
        self,
        filepaths: Sequence[str],
        labels: np.ndarray,
        class_indices: dict[str, int],
        maker: ExampleMaker,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int | None = None,
        class_mode: ClassMode = "categorical",
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        initial_epoch: int = 0,
        cache: bool = False,
        initial_step: int = 0,
        weights: np.ndarray | None = None,
    ) -> None:
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        self.examples = Examples(filepaths, maker, cache)
        self.labels = np.asarray(labels)
        self.class_indices = dict(class_indices)
        self.maker = maker
        self.batch_size = batch_size
        self.shuffle = shuffle
        # no seed: a random one, drawn once, so that the epochs still differ from each other
        self.seed = int(np.random.default_rng().integers(2**63)) if seed is None else seed
        self.class_mode = class_mode
        self.epoch = initial_epoch
        self.weights = weights
        self.index_array = self._order()
        self.offset = _check_step(initial_step, batches_per_epoch(self.n, batch_size))
        self._in_epoch = False

    # Keras-compatible attributes of the old DirectoryIterator
    @property
    def filepaths(self) -> list[str]:  # noqa: D102
        return self.examples.filepaths

    @property
    def n(self) -> int:  # noqa: D102
        return len(self.examples)

    samples = n

    @property
    def classes(self) -> np.ndarray:  # noqa: D102
        return self.labels

    @property
    def num_classes(self) -> int:  # noqa: D102
        return len(self.class_indices)

    def _order(self) -> np.ndarray:
        return epoch_order(self.n, self.seed, self.epoch, self.shuffle, self.weights)

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size) - self.offset

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index >= len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        index += self.offset
        chosen = self.index_array[index * self.batch_size : (index + 1) * self.batch_size]
        images = self.examples.batch(chosen, self.epoch, self.seed)
        return images, encode_labels(self.labels[chosen], self.num_classes, self.class_mode)

    def on_epoch_begin(self) -> None:
        self._in_epoch = True

    def on_epoch_end(self) -> None:
        # Keras' epoch iterator also calls this once when fit() starts, before any epoch
        # (EpochIterator.reset): that call must not skip the first epoch (or its offset).
        if not self._in_epoch:
            return
        self._in_epoch = False
        self.epoch += 1
        self.offset = 0
        self.index_array = self._order()


def _check_step(step: int, batches: int) -> int:
    if not 0 <= step < batches:
        raise ValueError(f"initial_step {step} is not a batch of an epoch of {batches} batches")
    return step


def _label_values(
    frame: pd.DataFrame, y_col: str, classes: Sequence[str] | None, class_mode: ClassMode
) -> tuple[np.ndarray, dict[str, int]]:
    if class_mode == "raw":
        return frame[y_col].to_numpy(), {}
    names = list(classes) if classes is not None else sorted(frame[y_col].astype(str).unique())
    indices = {name: i for i, name in enumerate(names)}
    values = frame[y_col].astype(str)
    unknown = sorted(set(values) - set(indices))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} in column {y_col!r} are not in classes {names}")
    return values.map(indices).to_numpy(dtype=np.int64), indices


class ImageDataAugmentor:
    """Drop-in for the recipe's ``ImageDataAugmentor`` (Keras 3, `keras.utils.PyDataset`).

    ``augment`` is an albumentations transform (called as ``augment(image=...)``),
    ``preprocess_input`` a function applied to each float32 image after augmentation,
    ``rescale`` a factor applied last (as in Keras' old ImageDataGenerator).
    """

    def __init__(
        self,
        augment: Transform | None = None,
        preprocess_input: Callable[[np.ndarray], np.ndarray] | None = None,
        rescale: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.augment = augment
        self.preprocess_input = preprocess_input
        self.rescale = rescale
        self.seed = seed

    def flow_from_dataframe(
        self,
        dataframe: pd.DataFrame,
        directory: str | Path | None = None,
        x_col: str = "filename",
        y_col: str = "class",
        target_size: tuple[int, int] = (256, 256),
        classes: Sequence[str] | None = None,
        class_mode: ClassMode = "categorical",
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        initial_epoch: int = 0,
        cache: bool = False,
        initial_step: int = 0,
        weights: np.ndarray | None = None,
    ) -> DataFrameIterator:
        """Batches from ``dataframe[x_col]`` (paths, relative to ``directory`` if given), starting
        at batch ``initial_step`` of epoch ``initial_epoch``; ``cache`` keeps decoded images in
        memory between epochs; ``weights``: per-row draw weights (`epoch_order`)."""
        for column in (x_col, y_col):
            if column not in dataframe.columns:
                raise ValueError(
                    f"column {column!r} not in dataframe (has {list(dataframe.columns)})"
                )
        base = Path(directory) if directory is not None else None
        paths = [str(base / p) if base else str(p) for p in dataframe[x_col]]
        labels, indices = _label_values(dataframe, y_col, classes, class_mode)
        maker = ExampleMaker(target_size, self.augment, self.preprocess_input, self.rescale)
        return DataFrameIterator(
            paths,
            labels,
            indices,
            maker,
            batch_size,
            shuffle,
            self.seed if seed is None else seed,
            class_mode,
            workers,
            use_multiprocessing,
            max_queue_size,
            initial_epoch,
            cache,
            initial_step,
            weights,
        )

    def flow_from_directory(
        self,
        directory: str | Path,
        target_size: tuple[int, int] = (256, 256),
        classes: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> DataFrameIterator:
        """Batches from ``directory/<class>/<image>`` (classes in alphabetical order by default)."""
        directory = Path(directory)
        names = (
            list(classes)
            if classes is not None
            else sorted(p.name for p in directory.iterdir() if p.is_dir())
        )
        rows = [
            (str(p.relative_to(directory)), name)
            for name in names
            for p in sorted((directory / name).iterdir())
            if p.is_file() and is_image_name(p)
        ]
        frame = pd.DataFrame(rows, columns=["filename", "class"])
        return self.flow_from_dataframe(
            frame, directory, "filename", "class", target_size, classes=names, **kwargs
        )


def make_tf_dataset(
    filepaths: Sequence[str],
    labels: np.ndarray,
    num_classes: int,
    maker: ExampleMaker,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int | None = None,
    class_mode: ClassMode = "categorical",
    initial_epoch: int = 0,
    repeat: bool = False,
    num_parallel_calls: int | None = None,
    cache: bool = False,
    initial_step: int = 0,
    weights: np.ndarray | None = None,
) -> tf.data.Dataset:
    """A tf.data pipeline with the same batches as `DataFrameIterator`.

    Elements are (epoch, indices of one batch), made from `epoch_order`; a parallel,
    order-keeping map turns each into a batch with `Examples.batch`, so batch ``b`` of epoch
    ``e`` depends on (seed, e, b) only, whatever the parallelism (``num_parallel_calls``, default
    AUTOTUNE). ``repeat``: epochs ``initial_epoch, initial_epoch + 1, ...`` without end (give
    ``model.fit`` ``steps_per_epoch=batches_per_epoch(n, batch_size)``); else the single epoch
    ``initial_epoch``. ``initial_step``: the first epoch starts at that batch (resuming a
    mid-epoch checkpoint); the batches before it are skipped as index lists, before any image
    is loaded. ``weights``: per-example draw weights (`epoch_order`).
    """
    n = len(filepaths)
    if n == 0:
        raise ValueError("no images to make batches from")
    seed = int(np.random.default_rng().integers(2**63)) if seed is None else seed
    height, width = maker.target_size
    examples = Examples(filepaths, maker, cache)
    encoded = tf.constant(encode_labels(np.asarray(labels), num_classes, class_mode))

    def order(epoch: np.int64) -> np.ndarray:
        return epoch_order(n, seed, int(epoch), shuffle, weights).astype(np.int64)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        indices = tf.numpy_function(order, [epoch], tf.int64, stateful=False)
        indices.set_shape((n,))
        batches = tf.data.Dataset.from_tensor_slices(indices).batch(batch_size)
        return batches.map(lambda chosen: (epoch, chosen))

    raw = maker.casts_only  # uint8 out of Python, cast by TF: 4x less memory traffic, no GIL

    def load(epoch: tf.Tensor, chosen: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images = tf.numpy_function(
            lambda e, i: examples.batch(i, int(e), seed, raw), [epoch, chosen],
            tf.uint8 if raw else tf.float32, stateful=False,
        )  # fmt: skip
        images.set_shape((None, height, width, 3))
        return tf.cast(images, tf.float32), tf.gather(encoded, chosen)

    if repeat:
        epochs = tf.data.Dataset.counter(initial_epoch)
    else:
        epochs = tf.data.Dataset.from_tensors(tf.constant(initial_epoch, tf.int64))
    batches = batches_per_epoch(n, batch_size)
    ds = epochs.flat_map(epoch_batches).skip(_check_step(initial_step, batches))
    if not repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches - initial_step))
    ds = ds.map(load, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_inputs(
    config: RunConfig,
    root: str | Path,
    frame: pd.DataFrame,
    class_names: Sequence[str],
    training: bool,
    class_mode: ClassMode = "categorical",
    initial_epoch: int = 0,
    initial_step: int = 0,
) -> Any:
    """Batches for ``frame`` (columns ``path``, ``label``) with the pipeline the config picks:
    augmented and shuffled when ``training``, resized only and in order otherwise.

    Training batches of epoch ``e`` are a function of (``config.data.seed``, e) only, the same
    for both pipelines and any number of workers; the first epoch yielded is ``initial_epoch``
    from its batch ``initial_step`` on (resume). Training with ``tf_data`` yields epochs without end: pass
    ``steps_per_epoch=batches_per_epoch(len(frame), batch_size)`` to ``model.fit``.
    The ``image_data_augmentor`` generator advances its epoch in ``on_epoch_end`` (Keras calls it).
    Training photos are drawn by their source's weight (``data.extra_sources``,
    `carclassifier.sources.sampling_weights`) when the weights differ.
    """
    size = config.input.image_size
    seed = config.data.seed
    transform = train_transform(config.augment, size, seed) if training else val_transform(size)
    cache = use_cache(config, len(frame))
    weights = sampling_weights(frame, config.data.extra_sources) if training else None
    log.info("%s inputs: %d images at %d px, %s, decoded-image cache %s (%.0f MB)",
             "training" if training else "validation", len(frame), size, config.input.pipeline,
             "in memory" if cache else "off", cache_megabytes(len(frame), size))  # fmt: skip
    if config.input.pipeline == "image_data_augmentor":
        generator = ImageDataAugmentor(augment=transform, seed=seed)
        frame = frame.assign(class_name=[class_names[i] for i in frame["label"]])
        return generator.flow_from_dataframe(
            frame,
            root,
            "path",
            "class_name",
            (size, size),
            classes=class_names,
            class_mode=class_mode,
            batch_size=config.input.batch_size,
            shuffle=training,
            workers=config.input.workers,
            initial_epoch=initial_epoch,
            cache=cache,
            initial_step=initial_step,
            weights=weights,
        )
    maker = ExampleMaker((size, size), transform)
    paths = [str(Path(root) / p) for p in frame["path"]]
    return make_tf_dataset(
        paths,
        frame["label"].to_numpy(),
        len(class_names),
        maker,
        config.input.batch_size,
        training,
        seed,
        class_mode,
        initial_epoch=initial_epoch,
        repeat=training,
        num_parallel_calls=config.input.workers,
        cache=cache,
        initial_step=initial_step,
        weights=weights,
    )
