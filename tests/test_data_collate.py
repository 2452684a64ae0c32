"""Padded collation, bounded-buffer packing and its document masks, per-batch token counts."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from ssi.data.collate import block_causal_mask, collate_packed, collate_padded, count_token_kinds
from ssi.data.packing import PackedDataset
from ssi.vocab.layout import SpeechVocab

# The tiny extended layout: BPE < 2000, specials 2000..2255, DSUs 2256..2555, modality 2556/2557.
VOCAB = SpeechVocab(n_bpe=2000, n_dsus=300)  # DSU ids 2256..2555
PAD = 2004


class ListDataset(torch.utils.data.Dataset):
    """Samples given literally; records the epoch it was told about."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples, self.epoch = samples, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def doc(first: int, n: int) -> dict:
    tokens = list(range(first, first + n))
    return {"tokens": tokens, "labels": list(tokens)}


def test_padded_collation_and_counts() -> None:
    batch = [
        {"tokens": [2000, 5, 6, 2557, 2300, 2301, 2001], "labels": [2000, 5, 6, 2557, 2300, 2301, 2001]},
        {"tokens": [2000, 7, 2009], "labels": [-100, 7, 2009]},
    ]
    out = collate_padded(batch, pad_id=PAD, vocab=VOCAB, pad_to_multiple_of=4)
    assert out["tokens"].shape == (2, 8)
    assert out["tokens"][1].tolist() == [2000, 7, 2009, PAD, PAD, PAD, PAD, PAD]
    assert out["labels"][1].tolist() == [-100, 7, 2009, -100, -100, -100, -100, -100]
    counts = {k: int(v) for k, v in out["token_counts"].items()}
    # text: 5, 6, 7; dsu: 2300, 2301; special: 2000, 2557, 2001, 2000, 2009; padding: 1 + 5.
    assert counts == {"text": 3, "dsu": 2, "special": 5, "padding": 6}
    with pytest.raises(ValueError, match="3 tokens but 2 labels"):
        collate_padded([{"tokens": [1, 2, 3], "labels": [1, 2]}], PAD, VOCAB)


def test_count_token_kinds_ignores_padding_positions_holding_any_id() -> None:
    tokens = torch.tensor([[1, 2300, 2001, 1]])
    valid = torch.tensor([[True, True, True, False]])
    assert {k: int(v) for k, v in count_token_kinds(tokens, valid, VOCAB).items()} == {
        "text": 1,
        "dsu": 1,
        "special": 1,
        "padding": 1,
    }
    assert [VOCAB.kind_of(i) for i in (0, 1999, 2000, 2256, 2555, 2556)] == [
        "text", "text", "special", "dsu", "dsu", "special"
    ]  # fmt: skip


def test_packs_are_torchtune_format_with_first_fit() -> None:
    data = ListDataset([doc(100, 5), doc(200, 4), doc(300, 3), doc(400, 2)])
    packs = list(PackedDataset(data, max_seq_len=8, pad_id=PAD, shuffle=False, open_packs=4))
    # First fit: [5, 3] fills pack 0 exactly; [4, 2] goes to pack 1 with 2 padding.
    assert [p["seq_lens"].tolist() for p in packs] == [[5, 3], [4, 2, 2]]
    first, second = packs
    assert first["tokens"].tolist() == [100, 101, 102, 103, 104, 300, 301, 302]
    assert first["input_pos"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    # A document's first label is ignored: after the shift it would be predicted across the boundary.
    assert first["labels"].tolist() == [-100, 101, 102, 103, 104, -100, 301, 302]
    assert second["tokens"].tolist() == [200, 201, 202, 203, 400, 401, PAD, PAD]
    assert second["labels"].tolist() == [-100, 201, 202, 203, -100, 401, -100, -100]
    assert second["input_pos"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert int(second["n_padding"]) == 2


def test_open_packs_bounds_the_buffer() -> None:
    data = ListDataset([doc(10 * i, n) for i, n in enumerate([6, 6, 3, 3, 2])])
    packs = list(PackedDataset(data, max_seq_len=8, pad_id=PAD, shuffle=False, open_packs=1))
    # One open pack: a sample that does not fit closes it, so packing degrades to sequential filling.
    assert [p["seq_lens"].tolist() for p in packs] == [[6, 2], [6, 2], [3, 3, 2]]  # [6, 2]: 6 tokens + 2 padding


def test_packed_mask_has_no_cross_document_attention() -> None:
    data = ListDataset([doc(100, 3), doc(200, 2), doc(300, 2)])
    packs = list(PackedDataset(data, max_seq_len=8, pad_id=PAD, shuffle=False))
    batch = collate_packed(packs, VOCAB)
    assert "mask" not in batch  # collate runs in DataLoader workers: the mask is built on the device
    mask = block_causal_mask(batch["seq_lens"], torch.device("cpu"))[0]  # dense on CPU: [L, L] bool
    document = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])  # the last position is padding (its own document)
    expected = (document[:, None] == document[None, :]) & torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(mask, expected)
    counts = {k: int(v) for k, v in batch["token_counts"].items()}
    assert counts == {"text": 7, "dsu": 0, "special": 0, "padding": 1}
    assert batch["input_pos"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]


def test_packed_and_padded_train_on_the_same_targets() -> None:
    samples = [doc(10, 4), doc(50, 3), doc(90, 5)]
    padded = collate_padded(samples, PAD, VOCAB)
    packs = list(PackedDataset(ListDataset(samples), max_seq_len=16, pad_id=PAD, shuffle=False))
    packed = collate_packed(packs, VOCAB)

    def targets(tokens: torch.Tensor, labels: torch.Tensor) -> set[tuple[int, int]]:
        # The training loop shifts: position t is trained to predict labels[t + 1].
        shifted = labels[:, 1:]
        return {(int(a), int(b)) for a, b in zip(tokens[:, :-1].flatten(), shifted.flatten(), strict=True) if b >= 0}

    assert targets(padded["tokens"], padded["labels"]) == targets(packed["tokens"], packed["labels"])


def test_ranks_and_workers_partition_each_epoch() -> None:
    data = ListDataset([doc(i, 1) for i in range(103)])
    shards = [PackedDataset(data, 4, PAD, seed=1, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(2)
    indices = [shard.sample_indices() for shard in shards]
    assert all(len(i) == 34 for i in indices)  # 103 // 3, the tail dropped so ranks stay in step
    assert len(set().union(*map(set, indices))) == 102
    by_worker = [shards[0].sample_indices(w, 2) for w in range(2)]
    assert sorted([*by_worker[0], *by_worker[1]]) == sorted(indices[0])
    assert data.epoch == 2
    shards[0].set_epoch(3)
    assert list(shards[0].sample_indices()) != list(indices[0])


def test_sample_longer_than_the_pack_is_an_error() -> None:
    with pytest.raises(ValueError, match="sample 0 has 9 tokens, more than the pack size 8"):
        list(PackedDataset(ListDataset([doc(0, 9)]), 8, PAD, shuffle=False))


def test_packing_through_a_dataloader_with_workers() -> None:
    data = ListDataset([doc(100 * i, 1 + i % 4) for i in range(40)])
    packed = PackedDataset(data, max_seq_len=8, pad_id=PAD, seed=3)
    packed.set_epoch(0)
    loader = torch.utils.data.DataLoader(
        packed, batch_size=2, num_workers=2, collate_fn=partial(collate_packed, vocab=VOCAB)
    )
    seen: list[int] = []
    for batch in loader:
        is_pad = batch["tokens"] == PAD
        assert int(batch["token_counts"]["padding"]) == int(is_pad.sum())
        seen.extend(batch["tokens"][~is_pad].tolist())
    assert sorted(seen) == sorted(t for s in data.samples for t in s["tokens"])
