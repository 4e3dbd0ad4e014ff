"""The decorator every component uses: a kfp v2 Python component on the trainer image.

The trainer image (``docker/``) has ``carclassifier`` and kfp installed, so components install
nothing at run time (``install_kfp_package=False``, no ``packages_to_install``): a component
body only imports `carclassifier.steps` and calls it.
"""

import os
from collections.abc import Callable
from typing import Any

from kfp import dsl
from kfp.dsl.python_component import PythonComponent

from carclassifier.kubeflow.cluster import PLACEHOLDER_IMAGE

IMAGE_ENV = "CARCLASSIFIER_TRAINER_IMAGE"
DEFAULT_IMAGE = PLACEHOLDER_IMAGE  # no registry has it: submit refuses a package naming it
TRAINER_IMAGE = os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
"""The image components run in: ``$CARCLASSIFIER_TRAINER_IMAGE`` or the default tag."""


def trainer_component(func: Callable[..., Any]) -> PythonComponent:
    """``@dsl.component`` on `TRAINER_IMAGE`, installing nothing."""
    return dsl.component(func, base_image=TRAINER_IMAGE, install_kfp_package=False)


def with_image(component: PythonComponent, image: str) -> PythonComponent:
    """The same component built on another image (e.g. a tag pushed by CI)."""
    return dsl.component(component.python_func, base_image=image, install_kfp_package=False)
