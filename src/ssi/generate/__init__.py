"""Generation: sampling options both backends honour (`sampling`), the PyTorch backend (`torch_backend`), the
vLLM backend (`vllm_backend`), beam search in both (`beam`), prompts built by the training data pipeline
(`prompts`), the command that writes and scores a split (`pipeline`), and the command that evaluates every
checkpoint of a run (`every_checkpoint`)."""


class GenerationError(ValueError):
    """A configuration or input that generation refuses before doing any work; the message names the key or file."""
