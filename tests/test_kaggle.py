import json
import zipfile

import pytest
from test_data import make_kaggle_layout

from carclassifier.cli import main
from carclassifier.errors import CredentialsError, DatasetError
from carclassifier.kaggle_data import download_competition, extract_archives, find_credentials


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    return tmp_path / "kaggle-config"


def test_missing_credentials_is_one_clear_line(no_credentials, tmp_path, capsys):
    assert find_credentials() is None
    assert main(["download-kaggle", "--dest", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no Kaggle credentials")
    assert "KAGGLE_USERNAME" in err and "kaggle.json" in err
    assert "\n" not in err and "Traceback" not in err


def test_broken_kaggle_json(no_credentials):
    no_credentials.mkdir()
    (no_credentials / "kaggle.json").write_text('{"username": "me"}')
    with pytest.raises(CredentialsError, match="lacks 'username' and 'key'"):
        download_competition(no_credentials / "dest")


def test_credentials_found_without_exposing_them(no_credentials, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3t-value")
    assert find_credentials() == "KAGGLE_USERNAME/KAGGLE_KEY"
    monkeypatch.delenv("KAGGLE_KEY")
    no_credentials.mkdir()
    (no_credentials / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    assert find_credentials() == str(no_credentials / "kaggle.json")


def test_nested_competition_zips_unpack_into_the_kaggle_layout(tmp_path):
    source = make_kaggle_layout(tmp_path / "source")
    dest = tmp_path / "dest"
    dest.mkdir()
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        for path in (source / "train").rglob("*.jpg"):
            zf.write(path, path.relative_to(source))
    with zipfile.ZipFile(dest / "sf-dl-car-classification.zip", "w") as zf:
        zf.write(tmp_path / "train.zip", "train.zip")
        zf.write(source / "train.csv", "train.csv")
        zf.write(source / "sample_submission.csv", "sample_submission.csv")
    extract_archives(dest)
    assert not list(dest.glob("*.zip"))
    from carclassifier.data import load_dataset

    ds = load_dataset(dest)
    assert ds.layout == "kaggle" and len(ds.records) == 9


def test_zip_with_unsafe_paths_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(DatasetError, match="unsafe path"):
        extract_archives(tmp_path)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_interrupted_download_is_named(tmp_path):
    (tmp_path / "partial.zip").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DatasetError, match="not a valid zip"):
        extract_archives(tmp_path)
