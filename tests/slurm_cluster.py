"""Whether the local Slurm cluster answers (snippets/local_slurm.sh): tests that submit jobs are marked
`needs_slurm` and skip with the reason otherwise."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def slurm_unavailable() -> str | None:
    """None when a partition answers, else why not and how to start the local cluster."""
    if shutil.which("sbatch") is None:
        return "Slurm is not installed (start a local cluster: sudo snippets/local_slurm.sh start)"
    status = subprocess.run(["bash", str(REPO / "snippets/local_slurm.sh"), "status"], capture_output=True)
    return None if status.returncode == 0 else "no Slurm partition answers (sudo snippets/local_slurm.sh start)"


needs_slurm = pytest.mark.skipif(slurm_unavailable() is not None, reason=slurm_unavailable() or "")
