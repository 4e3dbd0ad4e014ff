"""The EDA report: PNG figures (one per augmentation preset too), one self-contained HTML page."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carclassifier.config import AUGMENT_PRESETS
from carclassifier.data import Finding, ValidationReport, load_dataset, validate_dataset
from carclassifier.eda import FIGURES, MAX_FINDING_ROWS, render_html, write_eda_report

EVIL = "<script>alert(1)<script>.jpg"  # a legal file name on Linux; must never reach HTML raw
EMPTY_CLASS = "zaz $x"  # only a corrupt file, so 0 usable images; "$" would trip mathtext


class _Rows(HTMLParser):
    """Cell texts of every row of the table with id ``table_id``."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.rows = table_id, False, []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table" and ("id", self.table_id) in attrs:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th") and self.rows:
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def _table(page: str, table_id: str) -> list[list[str]]:
    parser = _Rows(table_id)
    parser.feed(page)
    return [[cell.strip() for cell in row] for row in parser.rows]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ValidationReport]:
    root = tmp_path_factory.mktemp("cars")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["audi_a4", "bmw_x5", "kia_rio"]):
        (root / name).mkdir()
        for i in range(3):
            size = (48 + 8 * i, 36 + 4 * c)
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.jpg", quality=90)
    Image.new("L", (40, 30), 128).save(root / "kia_rio" / EVIL, format="JPEG")  # grayscale
    (root / EMPTY_CLASS).mkdir()
    (root / EMPTY_CLASS / "bad.jpg").write_bytes(b"definitely not a jpeg" * 10)
    report = validate_dataset(load_dataset(root), progress=False)
    out = tmp_path_factory.mktemp("eda")
    page = write_eda_report(
        report, out, image_size=64, samples_per_class=3, augmented_images=2, augmented_views=2
    )
    return out, page, report


def test_writes_all_figures_and_the_page(built: tuple[Path, Path, ValidationReport]) -> None:
    out, page, _ = built
    assert page == out / "eda.html"
    for name in FIGURES:
        path = out / f"{name}.png"
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 150, name


def test_page_is_self_contained(built: tuple[Path, Path, ValidationReport]) -> None:
    page = built[1].read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(FIGURES) == 5 + len(AUGMENT_PRESETS)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower()


def test_class_table_and_findings(built: tuple[Path, Path, ValidationReport]) -> None:
    page = built[1].read_text(encoding="utf-8")
    classes = {row[0]: row[1:4] for row in _table(page, "classes")[1:]}
    assert classes == {
        "audi_a4": ["0", "3", "30.0%"],
        "bmw_x5": ["1", "3", "30.0%"],
        "kia_rio": ["2", "4", "40.0%"],
        EMPTY_CLASS: ["3", "0", "0.0%"],
    }
    findings = _table(page, "findings")
    by_file = {row[2]: row for row in findings if len(row) == 4}
    bad = f"{EMPTY_CLASS}/bad.jpg"
    assert by_file[bad][:2] == ["error", "not_an_image"]
    assert by_file[f"kia_rio/{EVIL}"][:2] == ["warning", "not_rgb"]
    assert any(row[1:3] == ["empty_class", EMPTY_CLASS] for row in findings if len(row) == 4)
    assert [row[0] for row in _table(page, "excluded")[1:]] == [bad]


def test_names_are_escaped(built: tuple[Path, Path, ValidationReport]) -> None:
    page = built[1].read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;script&gt;.jpg" in page


def test_findings_are_capped(built: tuple[Path, Path, ValidationReport]) -> None:
    report = built[2]
    many = [Finding("not_rgb", "warning", f"x/{i:03d}<b>.jpg", "mode L & co") for i in range(250)]
    page = render_html(ValidationReport(report.dataset, report.usable, report.excluded, many), {})
    rows = [row for row in _table(page, "findings") if len(row) == 4]
    assert len(rows) == MAX_FINDING_ROWS + 1  # + the header row
    assert f"and {250 - MAX_FINDING_ROWS} more findings" in page
    assert "x/000&lt;b&gt;.jpg" in page and "<b>.jpg" not in page and "mode L &amp; co" in page


def test_one_figure_per_augmentation_preset_on_the_same_photos(
    built: tuple[Path, Path, ValidationReport],
) -> None:
    out, page, _ = built
    text = page.read_text(encoding="utf-8")
    for name in AUGMENT_PRESETS:
        assert (out / f"augmentations_{name}.png").stat().st_size > 5_000, name
        assert f"The same images through augment.preset {name}: " in text
    with (
        Image.open(out / "augmentations_cropped.png") as a,
        Image.open(out / "augmentations_uncropped.png") as b,
    ):
        assert a.size == b.size  # same photos and views, so the same grid
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # different augmentation
