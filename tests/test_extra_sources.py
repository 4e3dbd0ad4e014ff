"""Extra data sources (data.extra_sources, carclassifier.sources): training-only photos from
other datasets, their classes mapped to ours, leaks left out, weighted draws per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import write_image
from PIL import Image

from carclassifier.config import load_config
from carclassifier.errors import ConfigError, DatasetError
from carclassifier.inputs import epoch_order
from carclassifier.lineage import data_version
from carclassifier.prepare import load_prepared, validate_and_split
from carclassifier.sources import sampling_weights


def _primary(root: Path) -> Path:
    """Two classes of five distinct photos in class folders."""
    for c, name in enumerate(("audi", "bmw")):
        for i in range(5):
            write_image(root / name / f"p{i}.jpg", (64, 48), seed=c * 10 + i)
    return root


def _extra(root: Path) -> Path:
    """Another dataset in the labels.csv layout: classes Audi, BMW and Citroen (unmapped)."""
    rows = []
    for c, name in enumerate(("Audi", "BMW", "Citroen")):
        for i in range(3):
            rel = f"{name}/e{i}.jpg"
            write_image(root / rel, (64, 48), seed=100 + c * 10 + i)
            rows.append({"path": rel, "class_name": name, "class_id": c})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def _config(tmp_path: Path, primary: Path, sources: list[dict], **data: object):
    recipe = {"data": {"root": str(primary), "val_fraction": 0.4, **data, "extra_sources": sources}}
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return load_config(path)


def _source(folder: Path, **changes: object) -> dict:
    return {"name": "web", "root": str(folder), "class_map": {"Audi": "audi", "BMW": "bmw"},
            **changes}  # fmt: skip


def test_extra_photos_train_only_unmapped_counted_leaks_listed_and_versioned(tmp_path):
    primary, extra = _primary(tmp_path / "cars"), _extra(tmp_path / "web")
    base = validate_and_split(_config(tmp_path, primary, []), tmp_path / "base", progress=False)
    assert set(base.split["source"]) == {"primary"} and base.sources is None
    assert base.data_version == data_version(
        base.dataset.root, base.report.usable["path"], base.report.usable["label"]
    )  # no extra source: the version is the primary data's, as before
    # a re-saved copy of a validation photo hides in the extra source's Audi folder
    held_out = base.subset("val").iloc[0]
    with Image.open(primary / held_out["path"]) as image:
        image.resize((48, 36)).save(extra / "Audi" / "copy.jpg", quality=60)
    labels = pd.read_csv(extra / "labels.csv")
    copy = {"path": "Audi/copy.jpg", "class_name": "Audi", "class_id": 0}
    pd.concat([labels, pd.DataFrame([copy])]).to_csv(extra / "labels.csv", index=False)
    assert held_out["class_name"] in ("audi", "bmw")

    out = tmp_path / "out"
    prepared = validate_and_split(_config(tmp_path, primary, [_source(extra)]), out, progress=False)
    split = pd.read_csv(out / "split.csv")
    web = split[split["source"] == "web"]
    assert set(web["subset"]) == {"train"} and set(web["class_name"]) <= {"audi", "bmw"}
    assert len(web) == 6  # 3 Audi + 3 BMW; the copy left out, Citroen dropped
    assert all((prepared.dataset.root / p).is_file() for p in web["path"])
    primary_rows = split[split["source"] == "primary"].reset_index(drop=True)
    pd.testing.assert_frame_equal(primary_rows, pd.read_csv(tmp_path / "base" / "split.csv"))

    leaks = pd.read_csv(out / "leaks.csv")
    assert list(leaks[["source", "subset"]].itertuples(index=False, name=None)) == [("web", "val")]
    assert leaks["train"][0].endswith("Audi/copy.jpg")
    assert leaks["held_out"][0] == held_out["path"]

    table = pd.read_csv(out / "sources.csv", keep_default_na=False).set_index("source")
    assert table.loc["web", ["listed", "unmapped", "leaked", "train", "val"]].tolist() == [
        10,
        3,
        1,
        6,
        0,
    ]
    assert table.loc["web", "unmapped_classes"] == "Citroen:3"
    assert table.loc["primary", "val"] == len(base.subset("val"))
    assert load_prepared(primary, out / "split.csv").sources is not None

    assert prepared.data_version != base.data_version
    heavier = validate_and_split(
        _config(tmp_path, primary, [_source(extra, weight=2.0)]), tmp_path / "w2", progress=False
    )
    assert heavier.data_version != prepared.data_version  # the source's weight is in it too


def test_clear_errors_for_a_bad_extra_source(tmp_path):
    primary, extra = _primary(tmp_path / "cars"), _extra(tmp_path / "web")
    bad_map = _source(extra, class_map={"Audi": "audi", "BMW": "bmw_x5"})
    with pytest.raises(DatasetError, match=r"'web': class_map maps to \['bmw_x5'\].*ours"):
        validate_and_split(_config(tmp_path, primary, [bad_map]), tmp_path / "o1", progress=False)
    gone = _source(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"nowhere does not exist; fix data.extra_sources 'web'"):
        validate_and_split(_config(tmp_path, primary, [gone]), tmp_path / "o2", progress=False)
    wrong = _source(extra, layout="kaggle")
    with pytest.raises(DatasetError, match="not in the kaggle layout.*looks like labels_csv"):
        validate_and_split(_config(tmp_path, primary, [wrong]), tmp_path / "o3", progress=False)
    for weight in (0, -1.5):
        with pytest.raises(ConfigError, match="weight"):
            _config(tmp_path, primary, [_source(extra, weight=weight)])
    with pytest.raises(ConfigError, match="used twice"):
        _config(tmp_path, primary, [_source(extra), _source(extra)])
    with pytest.raises(ConfigError, match="not 'primary'"):
        _config(tmp_path, primary, [_source(extra, name="primary")])


def test_epoch_order_is_todays_permutation_without_weights_and_weighted_with_them():
    n, seed = 50, 7
    for epoch in (0, 3):
        today = np.random.default_rng([seed, epoch]).permutation(n)
        assert np.array_equal(epoch_order(n, seed, epoch), today)
        assert np.array_equal(epoch_order(n, seed, epoch, weights=np.full(n, 1.0)), today)
    frame = pd.DataFrame({"source": ["primary"] * 30 + ["web"] * 20})
    assert sampling_weights(frame[frame["source"] == "primary"], []) is None
    from carclassifier.config import ExtraSource

    web = ExtraSource(name="web", root="/x", class_map={"a": "b"}, weight=4.0)
    assert sampling_weights(frame.assign(source="primary"), [web]) is None
    weights = sampling_weights(frame, [web])
    assert weights is not None and weights[0] == 1.0 and weights[-1] == 4.0
    drawn = np.concatenate([epoch_order(n, seed, e, weights=weights) for e in range(40)])
    share = np.mean(drawn >= 30)  # web: 20 photos x 4 against 30 x 1 -> 80/110
    assert abs(share - 80 / 110) < 0.03
    assert np.array_equal(epoch_order(n, seed, 5, weights=weights),
                          epoch_order(n, seed, 5, weights=weights))  # fmt: skip
    assert len(epoch_order(n, seed, 5, weights=weights)) == n
    with pytest.raises(DatasetError, match="does not have"):
        sampling_weights(frame, [])


def test_an_extra_source_on_gcs_is_downloaded_and_used(tmp_path, bucket):
    primary, extra = _primary(tmp_path / "cars"), _extra(tmp_path / "web")
    for path in extra.rglob("*"):
        if path.is_file():
            bucket.blob(f"sets/web/{path.relative_to(extra).as_posix()}").upload_from_filename(
                str(path)
            )
    uri = f"gs://{bucket.name}/sets/web"
    out = tmp_path / "out"
    config = _config(tmp_path, primary, [_source(extra, root=uri)], leak_check=False)
    prepared = validate_and_split(config, out, progress=False)
    web = prepared.split[prepared.split["source"] == "web"]
    assert len(web) == 6 and all(p.startswith("../out/extra/web/") for p in web["path"])
    table = json.loads((out / "validation-web.json").read_text())
    assert table["usable"] == 6


def test_make_inputs_draws_by_source_weight_and_keeps_todays_order_at_weight_one(tmp_path):
    from carclassifier.inputs import make_inputs

    primary = _primary(tmp_path / "cars")
    frame = pd.DataFrame(
        {"path": [f"{c}/p{i}.jpg" for c in ("audi", "bmw") for i in range(5)],
         "label": [0] * 5 + [1] * 5}
    )  # fmt: skip
    mixed = frame.assign(source=["primary"] * 6 + ["web"] * 4)

    def inputs(frame: pd.DataFrame, weight: float, pipeline: str = "image_data_augmentor"):
        config = _config(tmp_path, primary, [_source(tmp_path, weight=weight)])
        changes = {"pipeline": pipeline, "batch_size": 10}
        config = config.model_copy(update={"input": config.input.model_copy(update=changes)})
        return make_inputs(config, primary, frame, ["audi", "bmw"], training=True)

    today = inputs(frame, 1.0).index_array
    assert np.array_equal(today, np.random.default_rng([42, 0]).permutation(10))
    assert np.array_equal(inputs(mixed, 1.0).index_array, today)
    weighted = inputs(mixed, 50.0)
    assert not np.array_equal(weighted.index_array, today)
    assert np.mean(weighted.index_array >= 6) > 0.8
    # the tf.data pipeline draws the same photos (labels: web photos 6-9 are all bmw)
    images, labels = next(iter(inputs(mixed, 50.0, "tf_data")))
    assert np.array_equal(labels.numpy(), weighted[0][1])
    assert np.allclose(images.numpy(), weighted[0][0])


def test_the_dataset_artifact_carries_the_extra_source_and_the_eda_shows_it(tmp_path, monkeypatch):
    from carclassifier import artifacts, steps
    from carclassifier.config import dump_config

    monkeypatch.setenv(artifacts.SCRATCH_ENV, str(tmp_path / "scratch"))
    primary, extra = _primary(tmp_path / "cars"), _extra(tmp_path / "web")
    config = _config(tmp_path, primary, [_source(extra)])
    artifact = tmp_path / "artifact"
    manifest = steps.prepare_step(dump_config(config), [], str(primary), str(artifact))
    assert [(s["source"], s["train"], s["unmapped"]) for s in manifest["extra_sources"]] == [
        ("web", 6, 3)
    ]
    assert not (artifact / "extra").exists() and (artifact / "sources.csv").is_file()
    _, prepared, _ = artifacts.load_dataset_artifact(str(artifact))
    web = prepared.subset("train").query("source == 'web'")
    assert len(web) == 6 and all(p.startswith("../extra/web/") for p in web["path"])
    assert all((prepared.dataset.root / p).is_file() for p in web["path"])
    again = steps.prepare_step(
        dump_config(_config(tmp_path, primary, [_source(extra, weight=3.0)])), [], str(primary),
        str(tmp_path / "artifact2"),
    )  # fmt: skip
    assert again["data_version"] != manifest["data_version"]
    assert again["run_key"] != manifest["run_key"]
    from carclassifier.stages import stage_fingerprint

    heavier = _config(tmp_path, primary, [_source(extra, weight=3.0)])
    stage = config.stages[0]
    assert stage_fingerprint(config, stage, prepared, None) != stage_fingerprint(
        heavier, stage, prepared, None
    )  # a finished stage is not taken for one trained with other draws

    page = tmp_path / "eda.html"
    steps.eda_step(str(artifact), str(page))
    text = page.read_text(encoding="utf-8")
    assert '<table id="sources">' in text and "Citroen:3" in text and 'alt="sources"' in text
