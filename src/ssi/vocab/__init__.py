"""The speech vocabulary: the token-ID layout and its `ssi.json` manifest (`layout`), the two tokenizer
paths that must agree id for id (`tiktoken` for torchtune, `hf_tokenizer` for transformers and vLLM), and
the extension of a base Llama 3 checkpoint (`extend`). docs/vocabulary.md is the contract."""
