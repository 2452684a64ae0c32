"""The independent reader of our LoRA adapters: PEFT on top of transformers, in a process of its own.

    python tests/peft_reader.py <extended base dir> <checkpoint dir> <token ids as JSON>

prints {"max_abs_diff": ...} between the logits of `PeftModel.from_pretrained(<base>, <checkpoint>/adapter)`
and those of the merged checkpoint loaded by transformers (both fp32). torchao is hidden from this process:
PEFT >= 0.18.1 refuses to create LoRA layers next to torchao < 0.16, which torchtune 0.6.1 needs (a user
loads adapters for inference in an environment without torchtune, where this does not arise).
"""

from __future__ import annotations

import json
import sys

sys.modules["torchao"] = None  # importlib.util.find_spec("torchao") is None from here on

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main() -> None:
    base_dir, checkpoint, tokens = sys.argv[1], sys.argv[2], torch.tensor([json.loads(sys.argv[3])])
    load = {"dtype": torch.float32}
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(checkpoint, **load).eval()(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir, **load)
        adapted = PeftModel.from_pretrained(base, f"{checkpoint}/adapter").eval()(tokens).logits
    print(json.dumps({"max_abs_diff": float((merged - adapted).abs().max()), "scale": float(merged.abs().max())}))


if __name__ == "__main__":
    main()
