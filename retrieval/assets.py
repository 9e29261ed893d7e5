"""Find the project's data folders (`models/`, `templates/`, `prompts/`) in a checkout or a wheel.

In a source checkout (and an editable install) they sit at the repository's top level; a built
wheel carries them inside the packages (see `[tool.hatch.build.targets.wheel.force-include]`).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def asset_dir(name: str, package_dir: Path = _PACKAGE) -> Path:
    """Return the directory of asset folder `name`, preferring the copy shipped in the package."""
    shipped = package_dir / "_assets" / name
    if shipped.is_dir():
        return shipped
    checkout = package_dir.parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"asset folder {name!r} not found beside {package_dir} (broken install?)")
