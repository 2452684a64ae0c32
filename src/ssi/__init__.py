"""ssi: extend Llama 3 with discrete speech units, train with torchtune, generate with vLLM, evaluate.

Package map (docs/ holds the contracts): `vocab` (token-ID layout, tokenizers, extension), `model`
(architecture, builder, checkpointer), `data` (sources to batches), `train` (the recipe), `generate`
(vLLM and torch backends), `eval` (WER), `run_dir` (every path of a run directory), and the small
shared pieces `files`, `config`, `dtypes`, `devices`, `hf_dir`, `loggers`, `versions`.
"""

import logging
import sys

# torchao 0.14 warns on every import that its C++ kernels were built for another torch; torchtune 0.6.1
# does not need them (the pairing is pinned on purpose, README "Installing"). Keep that line out of every CLI.
logging.getLogger("torchao").setLevel(logging.ERROR)

EXIT_BAD_INPUT = 2  # every command line: a configuration or input error, reported in one line


def setup_cli_logging(level: int = logging.INFO) -> None:
    """One log format for every ssi command line tool (timestamps, so long runs show their pace)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def report_error(err: BaseException, code: int = EXIT_BAD_INPUT) -> int:
    """Tell the user what is wrong with their input in one line on stderr (no traceback); returns `code`."""
    print(f"error: {err}", file=sys.stderr)
    return code
