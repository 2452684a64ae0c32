"""Writing outputs so that a reader never sees half of one, and reading the JSON files tools exchange.

Every output of ssi (model directories, checkpoints, generations, scores, reports) is built under a
hidden temporary name beside its destination and renamed into place when complete: a crash leaves the
destination as it was, never a directory or file that looks finished but is not. Existing outputs are
replaced only when the caller says so (`overwrite`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class FileFormatError(ValueError):
    """A file that is missing or does not hold what its reader expects; the message names the file."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileFormatError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{path} is not valid JSON: {err}") from None


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """`indent=None` writes the compact form, several times faster for large files (tokenizer.json)."""
    Path(path).write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block completes.

    An existing `final` is refused unless `overwrite`, and then replaced only after the new one is
    complete. A failure removes the temporary directory and leaves `final` as it was.
    """
    final = Path(final)
    _refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(final)
    tmp = final.parent / f".{final.name}.partial-{socket.gethostname()}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def _remove_dead_partials(final: Path) -> None:
    """Delete `.<name>.partial-<host>-<pid>` folders beside `final` left by processes of this host that are
    gone (killed mid-write). Those of other hosts are kept: whether their writer lives cannot be known here."""
    host = socket.gethostname()
    for path in final.parent.glob(f".{glob.escape(final.name)}.partial-*"):
        writer_host, _, pid = path.name[len(f".{final.name}.partial-") :].rpartition("-")
        if writer_host == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str, overwrite: bool = False) -> None:
    """Write `text` beside `path` under a hidden name, then rename: readers see the old file or the new one."""
    path = Path(path)
    _refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any, overwrite: bool = False) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", overwrite)


def file_sha256(path: Path, chunk: int = 16 << 20) -> str:
    """The sha256 of a file's contents, read in chunks (weights files are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def append_jsonl(path: Path, record: Any) -> None:
    """Append one JSON line (a small history file: each line is written whole with one write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
