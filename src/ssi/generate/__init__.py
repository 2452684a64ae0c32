"""Generation: sampling options both backends honour (`sampling`), the PyTorch backend (`torch_backend`), the
vLLM backend (`vllm_backend`), prompts built by the training data pipeline (`prompts`), and the command
that writes and scores a split (`pipeline`)."""


class GenerationError(ValueError):
    """A configuration or input that generation refuses before doing any work; the message names the key or file."""
