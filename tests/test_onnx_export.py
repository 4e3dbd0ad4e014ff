"""ONNX export: ONNX Runtime gives Keras' probabilities; a mismatching conversion is refused."""

import numpy as np
import pytest

from carclassifier.errors import CarClassifierError
from carclassifier.export import ONNX_FILE, ONNX_TOLERANCE, export_onnx


def test_onnx_model_matches_keras_at_any_batch_size(tmp_path):
    import onnxruntime as ort
    from conftest import tiny_model

    model = tiny_model(size=32, num_classes=3)
    path = export_onnx(model, tmp_path)
    assert path == tmp_path / ONNX_FILE and [p.name for p in tmp_path.iterdir()] == [ONNX_FILE]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["output_0"]
    rng = np.random.default_rng(5)
    for batch in (1, 3):
        images = rng.uniform(0, 255, (batch, 32, 32, 3)).astype(np.float32)
        (got,) = session.run(["output_0"], {"image": images})
        expected = model.predict(images, verbose=0)
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, expected, atol=ONNX_TOLERANCE, rtol=0)


def test_a_conversion_that_differs_from_keras_is_not_written(tmp_path, monkeypatch):
    import keras
    from conftest import tiny_model

    model = tiny_model(size=32, num_classes=3)
    other = tiny_model(size=32, num_classes=3)
    other.set_weights([w * 1.5 for w in other.get_weights()])
    real_export = keras.Model.export

    def wrong_export(self, path, **kwargs):  # converts a different network
        return real_export(other, path, **kwargs)

    monkeypatch.setattr(keras.Model, "export", wrong_export)
    with pytest.raises(CarClassifierError, match="differs from Keras by .* not written"):
        export_onnx(model, tmp_path)
    assert list(tmp_path.iterdir()) == []
