"""Evaluation: word error rate (`wer`: normalisation and alignment; `references`: where references come
from; `scoring`: wer.json and its command line) and likelihood benchmarks (`items`: the item format;
`sequences`: items as training-style token sequences; `likelihood`: the torch and vLLM scorers; `benchmark`:
accuracies and output files; `pipeline`: scripts/evaluate.py; `converters`: from published forms)."""
