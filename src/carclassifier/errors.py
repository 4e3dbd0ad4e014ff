"""Errors a user can cause. Each message says what is wrong and what to do.

The CLI prints a `CarClassifierError` in one line and exits non-zero; any other exception is a
bug and keeps its traceback.
"""


def one_line(value: object, limit: int = 300) -> str:
    """``value`` as text on one line (whitespace runs folded), cut at ``limit`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CarClassifierError(Exception):
    """Base class of every error the user can fix."""


class ConfigError(CarClassifierError):
    """A config file or command-line override is invalid."""


class DatasetError(CarClassifierError):
    """A dataset is missing, has the wrong layout, or cannot be trained on."""


class CredentialsError(CarClassifierError):
    """Credentials (Kaggle, cloud storage) are missing or unusable."""


class DownloadError(CarClassifierError):
    """A download failed (network, permissions, unknown competition)."""


class BackboneError(CarClassifierError):
    """An unknown backbone, a bad image size for it, or unusable weights."""


class StorageError(CarClassifierError):
    """A local path or gs:// URI cannot be read or written."""


PREEMPTED_EXIT_CODE = 143
"""Exit status after SIGTERM (128 + 15): the stage stopped cleanly and resumes when restarted."""


class StagePreempted(SystemExit):
    """SIGTERM stopped a training stage cleanly after its last checkpoint; not an error: exits
    the process with `PREEMPTED_EXIT_CODE`, and a restart with the same arguments resumes."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message
