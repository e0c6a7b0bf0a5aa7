"""Where shipped presets live: the ``mappings/`` and ``connectors/`` folders.

In a wheel they sit inside the package (``custsync/_data/``); in a checkout (an editable
install) they are the repository's top-level folders. Both are looked up, wheel first.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dirs(kind: str) -> list[Path]:
    """The folders holding shipped files of ``kind`` ("mappings" or "connectors")."""
    candidates = [_PACKAGE / "_data" / kind, _PACKAGE.parent.parent / kind]
    return [path for path in candidates if path.is_dir()]


def _names(kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in data_dirs(kind):
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def mapping_names() -> dict[str, Path]:
    return _names("mappings")


def connector_profiles() -> dict[str, Path]:
    return _names("connectors")


def find_mapping(ref: str, *, base_dir: Path | None = None) -> Path | None:
    """A preset by name, or a mapping file by path (relative to ``base_dir``)."""
    looks_like_path = "/" in ref or "\\" in ref or ref.endswith(".toml")
    if not looks_like_path:
        preset = mapping_names().get(ref)
        if preset is not None:
            return preset
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return path
    if not looks_like_path and path.with_suffix(".toml").is_file():
        return path.with_suffix(".toml")
    return None
