"""A value that is either a local path or a hub id (`source=`, `encoder.model=`): which one it is, and an
error that names both readings when neither exists.

`data/my_corpu` has no leading `/` or `.`, so it is also a valid hub id; read as one, a typo costs a minute of
hub retries and then an "unreachable" error that never mentions the folder. So a value whose first
component exists here (the `data/` of `data/my_corpu`) is taken as a local path, and a missing local path
is refused at once with the closest names beside it.
"""

from __future__ import annotations

import difflib
from pathlib import Path

_LOCAL_PREFIXES = ("/", ".", "~")


def looks_local(value: str) -> bool:
    """True for what can only be a local path: it exists, starts like a path, or its first component is a
    folder here."""
    path = Path(value).expanduser()
    if path.exists() or value.startswith(_LOCAL_PREFIXES):
        return True
    first = Path(value).parts[0] if Path(value).parts else ""
    return len(Path(value).parts) > 1 and Path(first).is_dir()


def missing_path_message(key: str, value: str) -> str:
    """`key=value` names no local file or folder: say so, from where, and list the closest existing names."""
    path = Path(value).expanduser()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    names = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    where = f" (relative to {Path.cwd()})" if not path.is_absolute() else ""
    hint = f"; did you mean {' or '.join(str(parent / c) for c in close)}?" if close else ""
    return f"{key}={value}: no such local file or folder{where}{hint}"


def hub_failure_message(key: str, value: str, err: BaseException) -> str:
    """A value read as a hub id that the hub did not give: name both readings."""
    detail = " ".join(str(err).split())[:300]
    return (
        f"{key}={value}: there is no local file or folder {value} (relative to {Path.cwd()}), and as a hub id it "
        f"could not be loaded ({type(err).__name__}: {detail}); give an existing local path, or a hub id "
        "that exists (HF_HUB_OFFLINE=1 skips the hub's retries on a machine without network)"
    )
