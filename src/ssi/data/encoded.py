"""A folder written by scripts/encode_audio.py, as the data layer reads it: its `encoding.json` records the
encoder that made the units (docs/encoding.md, "Outputs"), which is the truth about their count and frame
rate. The encode package writes the manifest and owns its name (ssi.encode.output); this module reads its
encoder section."""

from __future__ import annotations

import json
from pathlib import Path

from ssi.data.sources import DataValidationError, Encoder
from ssi.encode.output import MANIFEST_NAME


def folder_encoder(source: str) -> Encoder | None:
    """The encoder recorded in an encoded folder's manifest; None for a source that has none."""
    manifest = Path(source).expanduser() / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        return Encoder.from_mapping(json.loads(manifest.read_text())["encoder"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataValidationError(f"{manifest}: no readable encoder section ({type(err).__name__}: {err})") from None
