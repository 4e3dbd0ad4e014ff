"""Training inputs are a function of (seed, epoch): any parallelism, either pipeline, resumable."""

import keras
import numpy as np
import pytest

from carclassifier.config import load_config
from carclassifier.data import load_dataset
from carclassifier.inputs import batches_per_epoch, make_inputs

BATCH = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import write_image

    root = tmp_path_factory.mktemp("det")
    for c, cls in enumerate(("audi", "bmw", "lada")):
        for i in range(3):
            write_image(root / cls / f"img_{i}.jpg", size=(60, 44), seed=c * 10 + i)
    ds = load_dataset(root)
    return ds, ds.records  # 9 images: batches of 4, 4, 1


def config(pipeline: str, workers: int = 1, seed: int = 7):
    return load_config(
        None,
        [
            f"input.pipeline={pipeline}",
            "input.image_size=32",
            f"input.batch_size={BATCH}",
            f"input.workers={workers}",
            f"data.seed={seed}",
        ],
    )


def epochs(inputs, count: int, steps: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """``count`` epochs of training batches, read the way ``model.fit`` reads them."""
    if hasattr(inputs, "as_numpy_iterator"):  # tf.data: one endless iterator, steps per epoch
        iterator = inputs.as_numpy_iterator()
        return [[next(iterator) for _ in range(steps)] for _ in range(count)]
    out = []  # PyDataset: Keras' adapter with its worker threads, on_epoch_end between epochs
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    adapter = PyDatasetAdapter(inputs, shuffle=False)
    for _ in range(count):
        adapter.on_epoch_begin()
        out.append(list(adapter.get_numpy_iterator()))
        adapter.on_epoch_end()
    return out


def make(
    dataset, pipeline: str, workers: int = 1, initial_epoch: int = 0, seed: int = 7,
    initial_step: int = 0,
):  # fmt: skip
    ds, frame = dataset
    return make_inputs(
        config(pipeline, workers, seed), ds.root, frame, ds.class_names, training=True,
        initial_epoch=initial_epoch, initial_step=initial_step,
    )  # fmt: skip


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def flat(epoch) -> np.ndarray:
    return np.concatenate([x for x, _ in epoch])


@pytest.mark.parametrize("pipeline", ["tf_data", "image_data_augmentor"])
def test_same_batches_whatever_the_parallelism(dataset, pipeline):
    steps = batches_per_epoch(len(dataset[1]), BATCH)
    serial = epochs(make(dataset, pipeline, workers=1), 2, steps)
    parallel = epochs(make(dataset, pipeline, workers=3), 2, steps)
    for a, b in zip(serial, parallel, strict=True):
        assert_same(a, b)
    assert [len(x) for x, _ in serial[0]] == [4, 4, 1]  # epochs never mix
    assert not np.array_equal(flat(serial[0]), flat(serial[1]))  # epochs differ


@pytest.mark.parametrize("pipeline", ["tf_data", "image_data_augmentor"])
def test_resumed_pipeline_starts_with_the_epoch_it_resumes(dataset, pipeline):
    steps = batches_per_epoch(len(dataset[1]), BATCH)
    uninterrupted = epochs(make(dataset, pipeline), 3, steps)
    resumed = epochs(make(dataset, pipeline, initial_epoch=2), 1, steps)
    assert_same(resumed[0], uninterrupted[2])
    assert not np.array_equal(flat(uninterrupted[1]), flat(uninterrupted[2]))
    orders = [np.concatenate([y.argmax(1) for _, y in e]) for e in uninterrupted]
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(dataset[1]["label"])
    assert len({tuple(o) for o in orders}) == 3  # reshuffled every epoch


@pytest.mark.parametrize("pipeline", ["tf_data", "image_data_augmentor"])
def test_a_pipeline_resumed_mid_epoch_yields_the_rest_of_that_epoch_then_whole_ones(
    dataset, pipeline
):
    steps = batches_per_epoch(len(dataset[1]), BATCH)
    uninterrupted = epochs(make(dataset, pipeline), 2, steps)
    resumed = make(dataset, pipeline, initial_epoch=1, initial_step=2)
    if pipeline == "tf_data":  # one endless iterator: the rest of epoch 1, then epoch 2
        rest = epochs(resumed, 1, steps - 2)[0]
    else:
        assert len(resumed) == steps - 2
        rest = epochs(resumed, 1, steps - 2)[0]
        assert len(resumed) == steps  # the next epoch is whole again
    assert_same(rest, uninterrupted[1][2:])
    with pytest.raises(ValueError, match="initial_step 3 is not a batch of an epoch of 3"):
        make(dataset, pipeline, initial_step=steps)


def test_both_pipelines_give_identical_training_batches_and_seed_matters(dataset):
    steps = batches_per_epoch(len(dataset[1]), BATCH)
    fast = epochs(make(dataset, "tf_data", workers=2), 2, steps)
    recipe = epochs(make(dataset, "image_data_augmentor", workers=2), 2, steps)
    for a, b in zip(fast, recipe, strict=True):
        assert_same(a, b)
    other_seed = epochs(make(dataset, "tf_data", seed=8), 1, steps)
    assert not np.array_equal(flat(fast[0]), flat(other_seed[0]))


@pytest.mark.parametrize("pipeline", ["tf_data", "image_data_augmentor"])
def test_model_fit_resumed_at_epoch_k_sees_what_an_uninterrupted_fit_saw(dataset, pipeline):
    """Records the input of every train step of model.fit, from 0 and resumed at epoch 2."""
    steps = batches_per_epoch(len(dataset[1]), BATCH)

    def fit(initial_epoch: int) -> dict[int, np.ndarray]:
        inputs = make(dataset, pipeline, workers=2, initial_epoch=initial_epoch)
        seen: dict[int, list[np.ndarray]] = {}

        image = keras.Input((32, 32, 3))
        pooled = keras.layers.GlobalAveragePooling2D()(image)
        model = keras.Model(image, keras.layers.Dense(3, activation="softmax")(pooled))
        model.compile("sgd", "categorical_crossentropy", run_eagerly=True)
        epoch_box = [initial_epoch]

        class Tap(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                epoch_box[0] = epoch
                seen[epoch] = []

        original = model.train_step

        def train_step(data):
            seen[epoch_box[0]].append(keras.ops.convert_to_numpy(data[0]))
            return original(data)

        model.train_step = train_step
        model.fit(inputs, epochs=3, initial_epoch=initial_epoch, steps_per_epoch=steps,
                  callbacks=[Tap()], verbose=0, shuffle=False)  # fmt: skip
        return {e: np.concatenate(v) for e, v in seen.items()}

    uninterrupted, resumed = fit(0), fit(2)
    assert sorted(uninterrupted) == [0, 1, 2] and sorted(resumed) == [2]
    assert len(resumed[2]) == len(dataset[1])  # one pass over the 9 images per epoch
    np.testing.assert_array_equal(resumed[2], uninterrupted[2])
    assert not np.array_equal(uninterrupted[1], uninterrupted[2])


@pytest.mark.parametrize("pipeline", ["tf_data", "image_data_augmentor"])
def test_cached_epochs_have_the_pixels_of_uncached_ones_without_reading_files(tmp_path, pipeline):
    from conftest import write_image

    for c, cls in enumerate(("audi", "bmw")):
        for i in range(3):
            write_image(tmp_path / cls / f"img_{i}.jpg", size=(70, 50), seed=c * 10 + i)
    ds = load_dataset(tmp_path)
    steps = batches_per_epoch(len(ds.records), BATCH)

    def inputs(cache: str):
        cfg = config(pipeline, workers=2)
        cfg.input.cache = cache
        return make_inputs(cfg, ds.root, ds.records, ds.class_names, training=True)

    uncached = epochs(inputs("off"), 2, steps)
    cached = inputs("memory")
    iterator = cached.as_numpy_iterator() if pipeline == "tf_data" else None
    if iterator is not None:
        first = [next(iterator) for _ in range(steps)]
    else:
        first = epochs(cached, 1, steps)[0]
    assert_same(first, uncached[0])
    for path in tmp_path.rglob("*.jpg"):  # epoch 2 must come from memory alone
        path.unlink()
    if iterator is not None:
        second = [next(iterator) for _ in range(steps)]
    else:  # the adapter called on_epoch_end: the generator is at epoch 1
        second = [cached[b] for b in range(steps)]
    assert_same(second, uncached[1])
    import tensorflow as tf

    with pytest.raises((FileNotFoundError, tf.errors.UnknownError), match="No such file"):
        epochs(inputs("off"), 1, steps)


def test_auto_cache_follows_the_memory_budget():
    from carclassifier.inputs import cache_megabytes, use_cache

    cfg = load_config(None, ["input.image_size=224", "input.cache=auto"])
    assert cache_megabytes(1000, 224) == pytest.approx(1000 * 224 * 224 * 3 / 2**20)
    cfg.input.cache_budget_mb = 144  # 1000 images at 224 px are 143.6 MB
    assert use_cache(cfg, 1000) and not use_cache(cfg, 1100)
    cfg.input.cache = "off"
    assert not use_cache(cfg, 1)
    cfg.input.cache = "memory"
    assert use_cache(cfg, 10**9)
