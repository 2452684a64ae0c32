"""Audio to discrete speech units: datasets the data presets read directly (docs/encoding.md).

A row walks forward: audio source (`sources`) -> mono waveform at the encoder's rate (`audio`, `reader`)
-> length-sorted batches that encode exactly as single utterances (`batching`) -> units (`encoders`:
HuBERT-like layer features + nearest k-means centroid (`kmeans`), or a Mimi codebook) -> parquet shards
and the `encoding.json` manifest (`output`). `pipeline` runs scripts/encode_audio.py, `kmeans_training`
scripts/train_kmeans.py; `fixtures` builds tiny random models and synthetic audio for tests and benchmarks.
"""


class EncodeError(ValueError):
    """Bad input to encoding (a source, column, row, model or k-means file); the message names it."""


__all__ = ["EncodeError"]
