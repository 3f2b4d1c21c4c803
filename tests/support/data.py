"""Where the repository and the test data are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
#: The real non-contrast abdomen CT, 112 slices (see tests/data/README.md).
ABDOMEN = DATA / "abdomen-noncontrast-112"


def abdomen_files() -> list[Path]:
    """The abdomen series' files, sorted by name."""
    return sorted(ABDOMEN.glob("*.dcm"))
#: Where tests write what a person should look at (key images, rendered GSPS, the SR tree).
OUTPUT = REPO / "tests" / "output"
