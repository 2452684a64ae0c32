"""The trained LoRA model as PEFT computes it, unmerged and in fp32, in a process of its own.

    python tests/peft_reference.py <extended base dir> <checkpoint dir> <request.json> <answer.pt>

`request.json`: {"logits_of": [token ids], "prompts": [[token ids], ...], "max_tokens": N, "stop": [ids]}.
`answer.pt` (torch.save): "base" and "trained", the logits of `logits_of` under the base model and under
`PeftModel.from_pretrained(<base>, <checkpoint>/adapter)` (both fp32, [positions x vocab]), and "outputs", each
prompt's greedy continuation under the latter (argmax at every step, the stop id included, at most
`max_tokens`: vLLM's greedy). torchao is hidden from this
process, as in tests/peft_reader.py (PEFT >= 0.18.1 refuses LoRA layers next to torchtune's torchao).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.modules["torchao"] = None  # importlib.util.find_spec("torchao") is None from here on

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    step = model(torch.tensor([prompt]), use_cache=True)
    out = [int(step.logits[0, -1].argmax())]
    while len(out) < max_tokens and out[-1] not in stop:
        step = model(torch.tensor([out[-1:]]), past_key_values=step.past_key_values, use_cache=True)
        out.append(int(step.logits[0, -1].argmax()))
    return out


def main() -> None:
    base_dir, checkpoint, request_path, answer_path = sys.argv[1:5]
    request = json.loads(Path(request_path).read_text())
    tokens = torch.tensor([request["logits_of"]])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        base = model(tokens).logits[0]
        model = PeftModel.from_pretrained(model, f"{checkpoint}/adapter").eval()
        trained = model(tokens).logits[0]
        stop = set(request["stop"])
        outputs = [greedy(model, p, request["max_tokens"], stop) for p in request["prompts"]]
    torch.save({"base": base, "trained": trained, "outputs": outputs}, answer_path)


if __name__ == "__main__":
    main()
