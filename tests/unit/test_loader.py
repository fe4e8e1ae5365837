"""The global batch order does not depend on world size or accumulation split."""

from __future__ import annotations

from ftdist.data.loader import GlobalBatchSampler, collate, eval_batches
from ftdist.data.prepare import Example


def test_step_gets_same_examples_for_any_split():
    n, seed = 37, 3
    one = GlobalBatchSampler(n, 8, seed)
    for step in range(12):  # crosses several epoch boundaries (37 is not a multiple of 8)
        reference = one.global_indices(step)
        for world, micro in ((1, 8), (1, 2), (2, 2), (2, 4), (4, 1), (8, 1)):
            got = []
            for rank in range(world):
                for mb in one.rank_micro_batches(step, rank, world, micro):
                    assert len(mb) == micro
                    got.extend(mb)
            assert got == reference


def test_every_example_once_per_epoch_and_nothing_dropped():
    n = 37
    s = GlobalBatchSampler(n, 8, seed=0)
    stream = [i for step in range(37) for i in s.global_indices(step)]  # 37*8 = 8 epochs exactly
    for epoch in range(8):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert s.global_indices(0) != GlobalBatchSampler(n, 8, seed=1).global_indices(0)
    assert s.global_indices(5) == GlobalBatchSampler(n, 8, seed=0).global_indices(5)


def test_ranks_get_disjoint_examples():
    s = GlobalBatchSampler(100, 12, seed=0)
    for step in range(5):
        parts = [set(i for mb in s.rank_micro_batches(step, r, 3, 2) for i in mb) for r in range(3)]
        assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]) and not (parts[0] & parts[2])


def test_collate_pads_right_and_counts_tokens():
    a = Example(input_ids=[5, 6, 7, 8], labels=[-100, -100, 7, 8], prompt_ids=None, reference=None)
    b = Example(input_ids=[9, 10], labels=[9, 10], prompt_ids=None, reference=None)
    batch = collate([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]
    assert batch.num_tokens == 6
    assert batch.num_label_tokens == 3  # after the shift: 7, 8 and 10 are predicted


def test_eval_shards_cover_validation_set_once():
    exs = [Example(list(range(k + 1)), list(range(k + 1)), None, None) for k in range(23)]
    seen = [i for r in range(3) for batch in eval_batches([len(e.input_ids) for e in exs], r, 3, 4) for i in batch]
    assert sorted(seen) == list(range(23))
