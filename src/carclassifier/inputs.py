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

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import pandas as pd

from carclassifier.augment import train_transform, val_transform
from carclassifier.config import RunConfig
from carclassifier.data import is_image_name, load_image

ClassMode = Literal["categorical", "sparse", "raw"]
Transform = Callable[..., dict[str, Any]]


class ExampleMaker:
    """Turns a path into a model-ready float32 image: decode, augment, preprocess, rescale."""

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

    def __call__(self, path: str | Path) -> np.ndarray:
        image = load_image(path, self.target_size)
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        x = image.astype(np.float32)
        if self.preprocess_input is not None:
            x = np.asarray(self.preprocess_input(x), dtype=np.float32)
        if self.rescale:
            x = x * np.float32(self.rescale)
        return x


def encode_labels(labels: np.ndarray, num_classes: int, class_mode: ClassMode) -> np.ndarray:
    """Labels as the model wants them: one-hot (categorical), int (sparse) or as given (raw)."""
    if class_mode == "categorical":
        return np.eye(num_classes, dtype=np.float32)[labels.astype(int)]
    if class_mode == "sparse":
        return labels.astype(np.int32)
    return labels


class DataFrameIterator(keras.utils.PyDataset):
    """Batches of (images, labels) from a dataframe; what `ImageDataAugmentor.flow_*` returns."""

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
    ) -> None:
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        self.filepaths = list(filepaths)
        self.labels = np.asarray(labels)
        self.class_indices = dict(class_indices)
        self.maker = maker
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.class_mode = class_mode
        self.epoch = 0
        self.index_array = self._order()

    # Keras-compatible attributes of the old DirectoryIterator
    @property
    def n(self) -> int:  # noqa: D102
        return len(self.filepaths)

    samples = n

    @property
    def classes(self) -> np.ndarray:  # noqa: D102
        return self.labels

    @property
    def num_classes(self) -> int:  # noqa: D102
        return len(self.class_indices)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng(
            None if self.seed is None else self.seed + self.epoch
        ).permutation(self.n)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index >= len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")
        chosen = self.index_array[index * self.batch_size : (index + 1) * self.batch_size]
        images = np.stack([self.maker(self.filepaths[i]) for i in chosen])
        return images, encode_labels(self.labels[chosen], self.num_classes, self.class_mode)

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.index_array = self._order()


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
    ) -> DataFrameIterator:
        """Batches from ``dataframe[x_col]`` (paths, relative to ``directory`` if given)."""
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
):  # noqa: ANN201 - tf.data.Dataset, tensorflow imported lazily
    """A tf.data pipeline with the same examples as `DataFrameIterator`: parallel map
    (AUTOTUNE) over `ExampleMaker`, batch, prefetch. Reshuffled every epoch when ``shuffle``."""
    import tensorflow as tf

    height, width = maker.target_size
    encoded = encode_labels(np.asarray(labels), num_classes, class_mode)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(filepaths, dtype=str), encoded))
    if shuffle:
        ds = ds.shuffle(len(filepaths), seed=seed, reshuffle_each_iteration=True)

    def _load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.numpy_function(lambda p: maker(p.decode()), [path], tf.float32, stateful=True)
        image.set_shape((height, width, 3))
        return image, label

    ds = ds.map(_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_inputs(
    config: RunConfig,
    root: str | Path,
    frame: pd.DataFrame,
    class_names: Sequence[str],
    training: bool,
    class_mode: ClassMode = "categorical",
) -> Any:
    """Batches for ``frame`` (columns ``path``, ``label``) with the pipeline the config picks:
    augmented and shuffled when ``training``, resized only and in order otherwise."""
    size = config.input.image_size
    seed = config.data.seed
    transform = train_transform(config.augment, size, seed) if training else val_transform(size)
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
    )
