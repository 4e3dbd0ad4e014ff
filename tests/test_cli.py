import json

import pandas as pd

from carclassifier.cli import main


def test_run_local_end_to_end(make_folder_dataset, tmp_path, capsys):
    root = make_folder_dataset(classes=("audi", "bmw", "lada"), per_class=6)
    (root / "bmw" / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    out = tmp_path / "run"
    stages = "stages=[{name: stage_1, description: head only, epochs: 1, unfreeze: 0.0, learning_rate: 0.01}]"
    code = main(["run-local", "--data", str(root), "--out", str(out), "--set", "model.weights=null",
                 "--set", "input.image_size=32", "--set", "input.batch_size=4", "--set", stages,
                 "--set", "augment.tta_views=2"])  # fmt: skip
    assert code == 0
    for name in ("config.yaml", "validation.json", "split.csv", "eda/eda.html", "summary.json",
                 "evaluation/evaluation.json", "export/labels.json", "stages/stage_1/best.keras"):  # fmt: skip
        assert (out / name).is_file(), name
    validation = json.loads((out / "validation.json").read_text())
    assert [e["path"] for e in validation["excluded"]] == ["bmw/broken.jpg"]
    split = pd.read_csv(out / "split.csv")
    assert "bmw/broken.jpg" not in set(split["path"]) and len(split) == 18
    printed = capsys.readouterr().out
    assert "| stage_1 | head only | 32 | 1 |" in printed
    assert "validation accuracy" in printed and "with TTA" in printed
    assert "submission: None" in printed  # class folders without a test folder: nothing to predict


def test_validate_names_corrupt_files_in_one_report(make_folder_dataset, tmp_path, capsys):
    root = make_folder_dataset(per_class=3)
    good = (root / "audi" / "img_0.jpg").read_bytes()
    (root / "audi" / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    assert main(["validate", "--data", str(root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 excluded" in out and "corrupt_image" in out and "audi/corrupt.jpg" in out


def test_untrainable_dataset_is_a_one_line_error(make_folder_dataset, capsys):
    root = make_folder_dataset(classes=("only",), per_class=2)
    assert main(["validate", "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: only 1 class(es)")
    assert "Traceback" not in err
