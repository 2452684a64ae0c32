"""Reports across training runs: one table and a few plots that answer what an experiment matrix asks.

`runs` reads one run directory (through `ssi.run_dir`, small files only: config, logs, `ssi.json`, `wer.json`,
`summary.json`; never weights) and notes what is missing; `table` puts runs side by side (one row per run
and checkpoint step, the settings that differ as columns, the best checkpoint of each run); `markdown` and
`plots` render it; `cli` is `scripts/report.py`. docs/experiments.md is the contract. Reading never writes
inside a run directory.
"""


class ReportInputError(ValueError):
    """A path given to the report that is not what it should be; the message names it."""
