"""carclassifier: staged fine-tuning of a pretrained EfficientNet on car photos.

All logic lives in this package; the CLI (`carclassifier.cli`), the Kubeflow components
(`components/`) and the pipelines (`pipelines/`) are thin shells over it.
"""

__version__ = "0.1.0"
