"""Serving the exported model: a Flask web page and JSON API behind waitress.

    carclassifier serve --model runs/local/export --port 8080

- `config.ServingConfig`: limits and defaults (upload size, files per request, top-k, pixels,
  TTA views), one object built from CLI flags;
- `predictor.Predictor`: loads an export once (``keras`` or ``saved_model`` backend) and
  predicts a batch of decoded images in one forward pass;
- `app.create_app`: the Flask app (page, ``/v1/predict``, ``/v1/model``, ``/healthz``,
  ``/readyz``, ``/metrics``, ``/openapi.yaml``);
- `server.serve`: waitress in front of the app, the model loaded in the background.
"""
