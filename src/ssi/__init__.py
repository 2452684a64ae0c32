"""ssi: extend Llama 3.2 with discrete speech units, train with torchtune, generate with vLLM, score WER."""

import logging

# torchao 0.14 warns on every import that its C++ kernels were built for another torch; torchtune 0.6.1
# does not need them (the pairing is pinned on purpose, README "Installing"). Keep that line out of every CLI.
logging.getLogger("torchao").setLevel(logging.ERROR)


def setup_cli_logging(level: int = logging.INFO) -> None:
    """One log format for every ssi command line tool (timestamps, so long runs show their pace)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
