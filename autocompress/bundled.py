"""The study files and search spaces that ship inside the package (found relative to it, so an installed
package runs from any folder). The lookup rule is :mod:`autocompress.config`'s."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_STUDIES = PACKAGE_DIR / "studies"
BUNDLED_SPACES = PACKAGE_DIR / "search_spaces"


def bundled_names(folder: Path) -> list[str]:
    """The names of the bundled YAML files in ``folder`` (:data:`BUNDLED_STUDIES`, :data:`BUNDLED_SPACES`)."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def bundled_file(spelling: str, folder: Path) -> Path | None:
    """The bundled file ``spelling`` names in ``folder``: ``NAME``, ``NAME.yaml`` or ``<folder name>/NAME.yaml``
    (the spelling of a repository checkout); None when it names none."""
    parts = Path(spelling).parts
    if len(parts) == 2 and parts[0] == folder.name:
        parts = parts[1:]
    if len(parts) != 1:
        return None
    path = folder / (parts[0] if parts[0].endswith(".yaml") else f"{parts[0]}.yaml")
    return path if path.is_file() else None
