"""Download the competition data with the official ``kaggle`` package, unzip and validate it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import zipfile
from pathlib import Path

from carclassifier.data import Dataset, load_dataset
from carclassifier.errors import CredentialsError, DatasetError, DownloadError

log = logging.getLogger(__name__)

COMPETITION = "sf-dl-car-classification"
CREDENTIALS_HELP = (
    "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), or put "
    "kaggle.json from https://www.kaggle.com/settings (Create New Token) in ~/.kaggle/ "
    "(or in $KAGGLE_CONFIG_DIR)"
)


def kaggle_config_dir() -> Path:
    """Where the kaggle client looks for ``kaggle.json`` / ``access_token``."""
    return Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")


def find_credentials() -> str | None:
    """Name the source of usable Kaggle credentials, or None. Never returns a secret."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    config_dir = kaggle_config_dir()
    json_file = config_dir / "kaggle.json"
    if json_file.is_file():
        try:
            values = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CredentialsError(
                f"{json_file} is not valid JSON ({exc}); download it again"
            ) from None
        if not (isinstance(values, dict) and values.get("username") and values.get("key")):
            raise CredentialsError(f"{json_file} lacks 'username' and 'key'; download it again")
        return str(json_file)
    if (config_dir / "access_token").is_file():
        return str(config_dir / "access_token")
    return None


def extract_archives(folder: Path) -> None:
    """Unzip every ``*.zip`` in ``folder`` in place (the competition zip holds train.zip, test.zip)."""
    pending = sorted(folder.glob("*.zip"))
    while pending:
        archive = pending.pop(0)
        log.info("unzipping %s", archive)
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    target = (folder / member).resolve()
                    if not target.is_relative_to(folder.resolve()):
                        raise DatasetError(
                            f"{archive} holds an unsafe path {member!r}; not extracting it"
                        )
                zf.extractall(folder)
                inner = [folder / n for n in zf.namelist() if n.endswith(".zip")]
        except zipfile.BadZipFile:
            raise DatasetError(
                f"{archive} is not a valid zip (interrupted download?); delete it and retry"
            ) from None
        archive.unlink()
        pending.extend(p for p in inner if p.is_file())


def download_competition(
    dest: str | Path, competition: str = COMPETITION, force: bool = False
) -> Dataset:
    """Download ``competition`` into ``dest``, unzip it and return the loaded dataset.

    Raises `CredentialsError` without credentials and `DownloadError` when Kaggle cannot be
    reached or refuses (e.g. the competition rules were not accepted).
    """
    source = find_credentials()
    if source is None:
        raise CredentialsError(CREDENTIALS_HELP)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    log.info(
        "downloading Kaggle competition %s into %s (credentials from %s)", competition, dest, source
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints auth help on import
        from kaggle.api.kaggle_api_extended import KaggleApi
    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit:
        raise CredentialsError(
            f"Kaggle rejected the credentials from {source}; {CREDENTIALS_HELP}"
        ) from None
    try:
        api.competition_download_files(competition, path=str(dest), force=force, quiet=False)
    except Exception as exc:  # the client raises requests/urllib3/HTTP errors of many kinds
        text = str(exc)
        hint = (
            "accept the competition rules on its Kaggle page first"
            if "403" in text
            else "check the competition name"
            if "404" in text
            else "check the network connection (or download the data elsewhere and pass --data DIR)"
        )
        raise DownloadError(
            f"download of {competition} failed ({type(exc).__name__}): {hint}"
        ) from None
    extract_archives(dest)
    return load_dataset(dest)
