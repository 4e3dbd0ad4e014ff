import numpy as np
import pandas as pd
import pytest

from carclassifier.augment import train_transform
from carclassifier.config import AugmentConfig, load_config
from carclassifier.data import load_dataset, load_image, make_split
from carclassifier.inputs import ImageDataAugmentor, batches_per_epoch, make_inputs


@pytest.fixture
def split_dataset(make_folder_dataset):
    ds = load_dataset(make_folder_dataset(per_class=6))
    return ds, make_split(ds.records, 0.5, seed=0)


def config(pipeline):
    return load_config(
        None, [f"input.pipeline={pipeline}", "input.image_size=32", "input.batch_size=4"]
    )


def collect(batches, steps=None):
    """One epoch; ``steps`` batches of an endless (training) tf.data pipeline."""
    if hasattr(batches, "as_numpy_iterator"):
        iterator = batches.as_numpy_iterator()
        return list(iterator) if steps is None else [next(iterator) for _ in range(steps)]
    return [batches[i] for i in range(len(batches))]


def test_both_pipelines_give_identical_validation_batches(split_dataset):
    ds, split = split_dataset
    val = split[split["subset"] == "val"].reset_index(drop=True)
    fast = collect(make_inputs(config("tf_data"), ds.root, val, ds.class_names, training=False))
    recipe = collect(
        make_inputs(config("image_data_augmentor"), ds.root, val, ds.class_names, training=False)
    )
    assert len(fast) == len(recipe) == 3  # 9 images in batches of 4
    for (xa, ya), (xb, yb) in zip(fast, recipe, strict=True):
        assert xa.dtype == xb.dtype == np.float32
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    labels = np.concatenate([y.argmax(axis=1) for _, y in fast])
    np.testing.assert_array_equal(labels, val["label"].to_numpy())


def test_both_pipelines_agree_on_shapes_labels_and_range_when_augmenting(split_dataset):
    ds, split = split_dataset
    train = split[split["subset"] == "train"].reset_index(drop=True)
    out = {}
    for pipeline in ("tf_data", "image_data_augmentor"):
        batches = collect(
            make_inputs(config(pipeline), ds.root, train, ds.class_names, training=True),
            steps=batches_per_epoch(len(train), 4),
        )
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        assert x.shape == (9, 32, 32, 3) and x.dtype == np.float32
        assert y.shape == (9, 3) and y.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 255.0 and x.max() > 1.0
        out[pipeline] = sorted(y.argmax(axis=1).tolist())
    assert out["tf_data"] == out["image_data_augmentor"] == sorted(train["label"].tolist())


def test_recipe_interface_flow_from_directory_and_dataframe(make_folder_dataset):
    root = make_folder_dataset(classes=("b_cls", "a_cls"), per_class=3)
    generator = ImageDataAugmentor(
        augment=train_transform(AugmentConfig(), 32, seed=0),
        preprocess_input=lambda x: x - 127.0,
        rescale=1 / 128,
        seed=1,
    )
    flow = generator.flow_from_directory(
        root, target_size=(32, 32), batch_size=4, class_mode="sparse"
    )
    assert flow.class_indices == {"a_cls": 0, "b_cls": 1}
    assert len(flow) == 2 and flow.samples == 6 and flow.num_classes == 2
    x, y = flow[0]
    assert x.shape == (4, 32, 32, 3) and y.dtype == np.int32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < 0
    first_order = flow.index_array.copy()
    flow.on_epoch_end()
    assert sorted(flow.index_array) == sorted(first_order)
    with pytest.raises(IndexError):
        flow[2]
    frame = pd.DataFrame({"file": ["a_cls/img_0.jpg"], "car": ["unknown"]})
    with pytest.raises(ValueError, match="not in classes"):
        generator.flow_from_dataframe(frame, root, "file", "car", classes=["a_cls", "b_cls"])


def test_load_image_converts_modes_and_resizes(tmp_path):
    from conftest import write_image

    gray = write_image(tmp_path / "g.jpg", size=(300, 200), mode="L")
    image = load_image(gray, (50, 60))
    assert image.shape == (50, 60, 3) and image.dtype == np.uint8
