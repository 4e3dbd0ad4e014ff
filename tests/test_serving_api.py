"""The serving app through Flask's test client: predictions, TTA, batching, bad input, security
headers, readiness, metrics, the page and the config; the predictor's two backends."""

from __future__ import annotations

import base64
import logging
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from serving_support import (
    CLASSES,
    METADATA,
    SIZE,
    export_fixture,
    jpeg_bytes,
    photos,
    png_bytes,
)

from carclassifier.augment import tta_transform
from carclassifier.cli import main
from carclassifier.config import AugmentConfig
from carclassifier.errors import StorageError
from carclassifier.serving.app import SECURITY_HEADERS, ModelSlot, create_app
from carclassifier.serving.config import ServingConfig
from carclassifier.serving.predictor import LOADERS, Predictor, decode_image


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return export_fixture(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def predictor(export_dir) -> Predictor:
    return Predictor.load(export_dir, "saved_model")


@pytest.fixture(scope="module")
def real_photos(tmp_path_factory) -> list[Path]:
    return photos(tmp_path_factory.mktemp("photos"), 4)


def make_client(predictor: Predictor | ModelSlot, **limits):
    config = ServingConfig(model="fixture", **limits)
    return create_app(config, predictor).test_client()


@pytest.fixture
def client(predictor):
    return make_client(predictor)


class CountingForward:
    """Wraps a predictor's forward function, recording the batch size of each call."""

    def __init__(self, predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[int] = []
        inner = predictor._forward

        def forward(batch: np.ndarray) -> np.ndarray:
            self.batches.append(len(batch))
            return inner(batch)

        monkeypatch.setattr(predictor, "_forward", forward)


def _files(paths: list[Path]) -> dict:
    return {"file": [(p.open("rb"), p.name) for p in paths]}


# --------------------------------------------------------------------------- predictor


def test_backends_agree_and_keras_loads_in_safe_mode(export_dir, real_photos):
    assert set(LOADERS) == {"keras", "saved_model", "onnx"}
    keras_p = Predictor.load(export_dir, "keras")
    saved_p = Predictor.load(export_dir, "saved_model")
    onnx_p = Predictor.load(export_dir, "onnx")
    assert keras_p.class_names == saved_p.class_names == onnx_p.class_names == CLASSES
    assert keras_p.image_size == saved_p.image_size == onnx_p.image_size == (SIZE, SIZE)
    images = [decode_image(p.read_bytes(), (SIZE, SIZE), 10**8) for p in real_photos]
    a, b, c = keras_p.predict(images), saved_p.predict(images), onnx_p.predict(images)
    assert a.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a, c, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)
    versions = {keras_p.version, saved_p.version, onnx_p.version}
    assert all(re.fullmatch(r"[0-9a-f]{12}", v) for v in versions) and len(versions) == 3


def test_auto_backend_is_onnx_when_the_export_has_it(export_dir, tmp_path):
    assert (export_dir / "model.onnx").is_file()  # written by write_export, checked vs Keras
    assert Predictor.load(export_dir).backend == "onnx"
    without = tmp_path / "no-onnx"
    shutil.copytree(export_dir, without)
    (without / "model.onnx").unlink()
    assert Predictor.load(without).backend == "saved_model"
    with pytest.raises(StorageError, match="has no model.onnx"):
        Predictor.load(without, "onnx")


def test_load_errors_name_the_problem(export_dir, tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        Predictor.load(tmp_path / "nowhere")
    with pytest.raises(StorageError, match="unknown backend 'tflite'"):
        Predictor.load(export_dir, "tflite")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "labels.json").write_text((export_dir / "labels.json").read_text())
    with pytest.raises(StorageError, match="saved_model/1/saved_model.pb is missing"):
        Predictor.load(tmp_path / "half", "saved_model")
    with pytest.raises(StorageError, match="model.keras is missing"):
        Predictor.load(tmp_path / "half", "keras")


def test_loads_from_gcs(export_dir, gcs_emulator, real_photos):
    from carclassifier.storage import gcs_client, upload_tree

    bucket = gcs_client().create_bucket(f"serving-{uuid.uuid4().hex[:8]}")
    upload_tree(export_dir, f"gs://{bucket.name}/runs/x/export")
    local = Predictor.load(export_dir, "saved_model")
    images = [decode_image(p.read_bytes(), (SIZE, SIZE), 10**8) for p in real_photos[:2]]
    assert Predictor.load(f"gs://{bucket.name}/runs/x/export").backend == "onnx"
    for backend in ("onnx", "saved_model", "keras"):
        remote = Predictor.load(f"gs://{bucket.name}/runs/x/export", backend)
        assert remote.class_names == CLASSES
        np.testing.assert_allclose(remote.predict(images), local.predict(images), atol=1e-4)
    with pytest.raises(StorageError, match="not a complete export"):
        Predictor.load(f"gs://{bucket.name}/runs/none", "saved_model")


# --------------------------------------------------------------------------- predict


def test_several_images_in_one_forward_pass(client, predictor, real_photos, monkeypatch):
    counter = CountingForward(predictor, monkeypatch)
    response = client.post("/v1/predict", data=_files(real_photos[:3]))
    assert response.status_code == 200, response.json
    body = response.json
    assert counter.batches == [3]
    assert body["model"] == {"name": "serving-test / tiny / stage_1", "version": predictor.version}
    assert body["tta"] is False
    assert [p["file"] for p in body["predictions"]] == [p.name for p in real_photos[:3]]
    images = [decode_image(p.read_bytes(), (SIZE, SIZE), 10**8) for p in real_photos[:3]]
    expected = predictor.predict(images)
    for row, prediction in zip(expected, body["predictions"], strict=True):
        top = prediction["top"]
        assert len(top) == 3
        assert [t["index"] for t in top] == list(np.argsort(-row, kind="stable")[:3])
        assert [t["class"] for t in top] == [CLASSES[t["index"]] for t in top]
        np.testing.assert_allclose([t["probability"] for t in top], row[[t["index"] for t in top]])


def test_json_base64_gives_the_same_answer_and_top_k(client, real_photos):
    photo = real_photos[0]
    multipart = client.post("/v1/predict", data=_files([photo])).json
    payload = {"images": [{"name": "x.jpg", "data": base64.b64encode(photo.read_bytes()).decode()}]}
    response = client.post("/v1/predict?top_k=2", json=payload)
    assert response.status_code == 200
    (prediction,) = response.json["predictions"]
    assert prediction["file"] == "x.jpg" and len(prediction["top"]) == 2
    assert prediction["top"] == multipart["predictions"][0]["top"][:2]
    everything = client.post("/v1/predict?top_k=99", json=payload).json["predictions"][0]["top"]
    assert [t["class"] for t in everything] == [
        t["class"] for t in multipart["predictions"][0]["top"]
    ]
    assert len(everything) == len(CLASSES)  # top_k above the class count gives every class


def test_tta_averages_views_in_one_pass_and_is_repeatable(client, predictor, monkeypatch):
    data = jpeg_bytes((80, 60), seed=3)
    counter = CountingForward(predictor, monkeypatch)
    first = client.post("/v1/predict?tta=1", data={"file": [(_io(data), "a.jpg")]}).json
    second = client.post("/v1/predict?tta=1", data={"file": [(_io(data), "a.jpg")]}).json
    plain = client.post("/v1/predict", data={"file": [(_io(data), "a.jpg")]}).json
    views = predictor.tta.views  # the fixture's export records no TTA: the library's 5 views
    assert counter.batches == [views, views, 1]
    assert first["tta"] is True and first["tta_views"] == views
    assert first["predictions"] == second["predictions"]
    image = decode_image(data, (SIZE, SIZE), 10**8)
    transform = tta_transform(AugmentConfig(), SIZE, predictor.tta.seed)
    expected = predictor.predict_tta([image], transform, views)[0]
    got = {t["index"]: t["probability"] for t in first["predictions"][0]["top"]}
    np.testing.assert_allclose([got[i] for i in got], expected[list(got)], atol=1e-5)
    assert first["predictions"] != plain["predictions"]  # the augmented views changed something


def _io(data: bytes):
    import io

    return io.BytesIO(data)


# --------------------------------------------------------------------------- bad input


def _truncated_jpeg() -> bytes:
    data = jpeg_bytes((400, 300), seed=1)
    return data[: len(data) // 2]


BAD_INPUTS = {
    # name: (request kwargs (made when the case runs), status, error code, words in the message)
    "empty body": (lambda: dict(data=b"", content_type="image/jpeg"), 400, "empty_body", "empty"),
    "empty multipart": (
        lambda: dict(data={}, content_type="multipart/form-data"),
        400,
        "no_files",
        "'file'",
    ),
    "empty file": (lambda: dict(data={"file": [(_io(b""), "e.jpg")]}), 400, "empty_file", "e.jpg"),
    "text file": (
        lambda: dict(data={"file": [(_io(b"hello, not a picture\n" * 20), "notes.txt")]}),
        400,
        "not_an_image",
        "notes.txt: not an image",
    ),
    "truncated JPEG": (
        lambda: dict(data={"file": [(_io(_truncated_jpeg()), "cut.jpg")]}),
        400,
        "corrupt_image",
        "truncated",
    ),
    "huge image": (
        lambda: dict(data={"file": [(_io(png_bytes((3000, 2000))), "huge.png")]}),
        413,
        "image_too_large",
        "the limit is 5000000",
    ),
    "decompression bomb": (
        lambda: dict(data={"file": [(_io(png_bytes((12000, 12000))), "bomb.png")]}),
        413,
        "image_too_large",
        "bomb.png",
    ),
    "oversized upload": (
        lambda: dict(data={"file": [(_io(b"\xff" * 300_000), "big.jpg")]}),
        413,
        "upload_too_large",
        "limit is 0.25 MiB",
    ),
    "wrong content type": (
        lambda: dict(data=jpeg_bytes(), content_type="image/jpeg"),
        415,
        "unsupported_media_type",
        "image/jpeg",
    ),
    "too many files": (
        lambda: dict(data={"file": [(_io(jpeg_bytes(seed=i)), f"{i}.jpg") for i in range(5)]}),
        413,
        "too_many_files",
        "at most 4",
    ),
    "wrong field name": (
        lambda: dict(data={"image": [(_io(jpeg_bytes()), "a.jpg")]}),
        400,
        "bad_field",
        "'file'",
    ),
    "bad json": (lambda: dict(json={"pictures": []}), 400, "bad_json", "images"),
    "bad base64": (
        lambda: dict(json={"images": [{"data": "***"}]}),
        400,
        "bad_base64",
        "images[0]",
    ),
    "bad top_k": (
        lambda: dict(query_string={"top_k": "0"}, data={"file": [(_io(jpeg_bytes()), "a.jpg")]}),
        400,
        "bad_parameter",
        "top_k",
    ),
    "bad tta": (
        lambda: dict(query_string={"tta": "maybe"}, data={"file": [(_io(jpeg_bytes()), "a.jpg")]}),
        400,
        "bad_parameter",
        "tta",
    ),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # expected here
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_json_error_and_the_app_keeps_answering(predictor, case):
    make_kwargs, status, code, words = BAD_INPUTS[case]
    kwargs = make_kwargs()
    client = make_client(predictor, max_upload_mib=0.25, max_files=4, max_image_pixels=5_000_000)
    response = client.post("/v1/predict", **kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error = response.json["error"]
    assert error["code"] == code and words in error["message"]
    ok = client.post("/v1/predict", data={"file": [(_io(jpeg_bytes()), "fine.jpg")]})
    assert ok.status_code == 200 and len(ok.json["predictions"]) == 1


def test_pillow_bomb_guard_is_a_413(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises beyond twice this
    with pytest.raises(Exception, match="too many pixels to decode") as info:
        decode_image(png_bytes((100, 100)), (SIZE, SIZE), 10**8)
    assert info.value.status == 413 and info.value.code == "image_too_large"


def test_decode_image_limits():
    with pytest.raises(Exception, match="the limit is 999") as info:
        decode_image(png_bytes((100, 100)), (SIZE, SIZE), 999)
    assert info.value.status == 413
    assert decode_image(png_bytes((100, 100)), (SIZE, SIZE), 10_000).shape == (SIZE, SIZE, 3)


# --------------------------------------------------------------------------- the rest


def test_security_headers_on_every_response(client):
    responses = [
        client.get("/"),
        client.get("/healthz"),
        client.get("/v1/model"),
        client.get("/static/app.js"),
        client.get("/nope"),
        client.post("/v1/predict", data=b"x", content_type="text/plain"),
        client.get("/v1/predict"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 415, 405]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (response.request.path, name)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "http" not in csp and "'unsafe-inline'" not in csp and "*" not in csp
    assert responses[4].json["error"]["code"] == "not_found"


def test_no_route_touches_the_filesystem_with_request_paths(client, predictor):
    app = create_app(ServingConfig(model="fixture"), predictor)
    with_arguments = [r.rule for r in app.url_map.iter_rules() if r.arguments]
    assert with_arguments == ["/static/<path:filename>"]  # Flask's safe_join-guarded static files
    for path in (
        "/static/../serving/app.py",
        "/static/..%2f..%2fapp.py",
        "/static/%2e%2e/config.py",
    ):
        assert client.get(path).status_code == 404
    assert app.debug is False


def test_uploads_are_never_saved_under_their_names(client, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # werkzeug spools big parts here
    monkeypatch.chdir(tmp_path)
    token = uuid.uuid4().hex
    big = jpeg_bytes((1200, 900), seed=5) + b"\0" * 600_000  # spooled, not kept in memory
    names = [f"{token}.jpg", f"../../{token}-up.jpg", f"/tmp/{token}-abs.jpg"]
    files = {"file": [(_io(big), names[0]), (_io(jpeg_bytes()), names[1]), (_io(big), names[2])]}
    response = client.post("/v1/predict", data=files)
    assert (
        response.status_code == 200 and [p["file"] for p in response.json["predictions"]] == names
    )
    assert not list(tmp_path.rglob(f"*{token}*"))
    for base in (tmp_path.parent, tmp_path.parent.parent, Path("/tmp")):
        assert not list(base.glob(f"*{token}*")), base


def test_readiness_follows_model_loading(predictor):
    slot = ModelSlot()
    client = make_client(slot)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    response = client.post("/v1/predict", data={"file": [(_io(jpeg_bytes()), "a.jpg")]})
    assert response.status_code == 503 and response.json["error"]["code"] == "loading"
    assert "still loading" in client.get("/").get_data(as_text=True)
    slot.set(predictor)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["version"] == predictor.version
    assert "carclassifier_model_loaded 1.0" in client.get("/metrics").get_data(as_text=True)


def test_prometheus_metrics_count_requests_latency_and_errors(client):
    client.post("/v1/predict", data={"file": [(_io(jpeg_bytes()), "a.jpg")]})
    client.post("/v1/predict", data={"file": [(_io(b"nope"), "b.txt")]})
    text = client.get("/metrics").get_data(as_text=True)
    series = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    route = 'route="/v1/predict"'
    assert series[f'carclassifier_http_requests_total{{method="POST",{route},status="200"}}'] == 1
    assert series[f'carclassifier_http_requests_total{{method="POST",{route},status="400"}}'] == 1
    assert series[f'carclassifier_http_errors_total{{code="not_an_image",{route}}}'] == 1
    assert series[f"carclassifier_http_request_duration_seconds_count{{{route}}}"] == 2
    assert series["carclassifier_images_predicted_total"] == 1


def test_request_log_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="carclassifier.serving.app"):
        client.post(
            "/v1/predict", data={"file": [(_io(jpeg_bytes(seed=i)), "a.jpg") for i in (1, 2)]}
        )
    assert re.search(r"POST /v1/predict 200 [\d.]+ ms 2 images", caplog.text), caplog.text


def test_model_endpoint_and_page_show_the_export(client, predictor):
    info = client.get("/v1/model").json
    assert info["classes"] == CLASSES and info["image_size"] == [SIZE, SIZE]
    assert info["metrics"] == {"val_accuracy": METADATA["val_accuracy"]}
    assert info["backend"] == "saved_model" and info["version"] == predictor.version
    assert info["limits"]["max_files"] == ServingConfig().max_files
    page = client.get("/").get_data(as_text=True)
    assert "serving-test / tiny / stage_1" in page and "75.00%" in page
    assert all(f"<li>{name}</li>" in page for name in CLASSES)
    # Everything the page loads comes from the app itself, and exists.
    refs = [r for r in re.findall(r'(?:src|href)="([^"]+)"', page) if r != "data:,"]  # no favicon
    assert refs and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    for ref in refs:
        assert client.get(ref).status_code == 200, ref
    assert "<script>" not in page and "style=" not in page  # nothing inline (CSP)


def test_openapi_describes_every_api_route(client, predictor):
    spec = yaml.safe_load(client.get("/openapi.yaml").get_data(as_text=True))
    assert spec["openapi"].startswith("3.")
    app = create_app(ServingConfig(model="fixture"), predictor)
    api_routes = {
        r.rule for r in app.url_map.iter_rules() if r.endpoint not in ("static", "index", "openapi")
    }
    assert set(spec["paths"]) == api_routes


def test_cli_flags_build_one_config(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("carclassifier.serving.server.serve", lambda config: seen.update(c=config))
    argv = ["serve", "--model", "gs://b/export", "--port", "9000", "--max-upload-mib", "2"]
    assert main([*argv, "--max-files", "3", "--top-k", "5", "--tta-views", "4"]) == 0
    config = seen["c"]
    assert (config.model, config.port, config.max_upload_mib) == ("gs://b/export", 9000, 2.0)
    assert (config.max_files, config.top_k, config.tta_views) == (3, 5, 4)
    assert config.backend == "auto" and config.host == "127.0.0.1"
    assert main(["serve", "--max-files", "0"]) == 2
    assert "error: serve: --max-files:" in capsys.readouterr().err
