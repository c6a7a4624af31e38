"""ClassBalancedBatchSampler: batch composition, replacement, reproducibility, validation."""
import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nbkernels.sampler import ClassBalancedBatchSampler


def _labels():
    # 5 classes with non-contiguous ids and unequal sizes: 20, 12, 9, 30, 3 samples.
    sizes = {0: 20, 3: 12, 7: 9, 11: 30, 42: 3}
    y = torch.cat([torch.full((n,), c) for c, n in sizes.items()])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))], sizes


@pytest.mark.parametrize("k, m", [(1, 1), (2, 4), (3, 3), (5, 2)])
def test_every_batch_has_m_samples_of_k_distinct_classes(k, m):
    y, _ = _labels()
    sampler = ClassBalancedBatchSampler(y, k, m, num_batches=50, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    for batch in batches:
        assert len(batch) == k * m
        labels = y[batch].tolist()
        counts = collections.Counter(labels)
        assert len(counts) == k
        assert set(counts.values()) == {m}
        # grouped by class: each consecutive run of m indices shares one label
        for start in range(0, k * m, m):
            assert len(set(labels[start:start + m])) == 1


def test_no_duplicates_when_the_class_is_large_enough():
    y, _ = _labels()
    for batch in ClassBalancedBatchSampler(y, 4, 9, num_batches=100, seed=2):
        for start in range(0, len(batch), 9):
            group = batch[start:start + 9]
            if int(y[group[0]]) != 42:  # class 42 has 3 samples: drawn with replacement
                assert len(set(group)) == 9


def test_small_class_is_drawn_with_replacement():
    y, sizes = _labels()
    m = 8
    assert sizes[42] < m
    seen = []
    for batch in ClassBalancedBatchSampler(y, 5, m, num_batches=20, seed=3):
        group = [i for i in batch if int(y[i]) == 42]
        assert len(group) == m
        assert len(set(group)) <= sizes[42]
        seen += group
    assert set(seen) == set(torch.nonzero(y == 42).flatten().tolist())


def test_classes_and_samples_are_covered_evenly():
    y, _ = _labels()
    # k divides C: every round of C/k batches shows every class exactly once.
    sampler = ClassBalancedBatchSampler(y, 5, 3, num_batches=40, seed=4)
    class_count = collections.Counter()
    sample_count = collections.Counter()
    for batch in sampler:
        class_count.update(set(y[batch].tolist()))
        sample_count.update(batch)
    assert set(class_count.values()) == {40}
    # class 11 (30 samples) is drawn 3 per batch, 120 draws: every sample 4 times
    members_11 = torch.nonzero(y == 11).flatten().tolist()
    assert {sample_count[i] for i in members_11} == {4}
    # k = 2 of 5 classes: rounds are topped up, so class counts differ by at most one round
    counts = collections.Counter()
    for batch in ClassBalancedBatchSampler(y, 2, 2, num_batches=100, seed=5):
        counts.update(set(y[batch].tolist()))
    assert sum(counts.values()) == 200
    assert max(counts.values()) - min(counts.values()) <= 2


def test_same_seed_same_batches_and_passes_continue():
    y, _ = _labels()
    a = ClassBalancedBatchSampler(y, 3, 4, num_batches=10, seed=7)
    b = ClassBalancedBatchSampler(y, 3, 4, num_batches=10, seed=7)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    second_a = list(a)
    assert second_a == list(b)
    assert second_a != first_a  # a new pass draws new batches
    assert list(ClassBalancedBatchSampler(y, 3, 4, num_batches=10, seed=8)) != first_a
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert list(ClassBalancedBatchSampler(y, 3, 4, num_batches=5, generator=g1)) == \
        list(ClassBalancedBatchSampler(y, 3, 4, num_batches=5, generator=g2))
    torch.manual_seed(10)
    c = list(ClassBalancedBatchSampler(y, 3, 4, num_batches=5))
    torch.manual_seed(10)
    assert list(ClassBalancedBatchSampler(y, 3, 4, num_batches=5)) == c


def test_default_length_and_other_label_containers():
    y, _ = _labels()
    assert len(ClassBalancedBatchSampler(y, 2, 4, seed=0)) == len(y) // 8
    assert len(ClassBalancedBatchSampler(torch.tensor([0, 1, 1]), 2, 4, seed=0)) == 1
    from_numpy = list(ClassBalancedBatchSampler(y.numpy(), 2, 4, seed=0))
    from_list = list(ClassBalancedBatchSampler(y.tolist(), 2, 4, seed=0))
    assert from_numpy == from_list == list(ClassBalancedBatchSampler(y, 2, 4, seed=0))
    assert len(ClassBalancedBatchSampler(y, np.int64(2), np.int64(4), seed=np.int64(0))) == len(y) // 8


def test_works_as_a_dataloader_batch_sampler():
    y, _ = _labels()
    x = torch.arange(len(y), dtype=torch.float32)[:, None]
    loader = DataLoader(TensorDataset(x, y), batch_sampler=ClassBalancedBatchSampler(y, 3, 2, num_batches=4, seed=0))
    batches = list(loader)
    assert len(batches) == 4
    for xb, yb in batches:
        assert xb.shape == (6, 1)
        assert torch.equal(y[xb[:, 0].long()], yb)
        assert sorted(collections.Counter(yb.tolist()).values()) == [2, 2, 2]


@pytest.mark.parametrize("labels, kwargs, exc, fragment", [
    (torch.tensor([0.0, 1.0]), {}, TypeError, "labels must have an integer dtype, got torch.float32"),
    (torch.tensor([[0, 1]]), {}, ValueError, "labels must be 1-D"),
    (torch.tensor([], dtype=torch.long), {}, ValueError, "labels must not be empty"),
    ([], {}, ValueError, "labels must not be empty"),   # an empty list becomes a float tensor
    ("ab", {}, TypeError, "labels must be a 1-D sequence of integers"),
    (torch.tensor([0, 1, 1]), {"classes_per_batch": 3}, ValueError,
     "classes_per_batch must be <= the number of distinct labels (2), got 3"),
    (torch.tensor([0, 1, 1]), {"classes_per_batch": 0}, ValueError, "classes_per_batch must be >= 1, got 0"),
    (torch.tensor([0, 1, 1]), {"samples_per_class": 0}, ValueError, "samples_per_class must be >= 1, got 0"),
    (torch.tensor([0, 1, 1]), {"samples_per_class": 2.0}, TypeError, "samples_per_class must be an int, got float"),
    (torch.tensor([0, 1, 1]), {"num_batches": 0}, ValueError, "num_batches must be >= 1, got 0"),
    (torch.tensor([0, 1, 1]), {"seed": 1, "generator": torch.Generator()}, ValueError,
     "pass either generator or seed"),
    (torch.tensor([0, 1, 1]), {"seed": "1"}, TypeError, "seed must be an int or None, got str"),
    (torch.tensor([0, 1, 1]), {"generator": 3}, TypeError, "generator must be a torch.Generator, got int"),
])
def test_bad_arguments_name_the_argument(labels, kwargs, exc, fragment):
    args = {"classes_per_batch": 2, "samples_per_class": 2, **kwargs}
    with pytest.raises(exc) as info:
        ClassBalancedBatchSampler(labels, args.pop("classes_per_batch"), args.pop("samples_per_class"), **args)
    assert fragment in str(info.value)


# --- every sample of a class before any repeats, also when m does not divide the class size ---

def _draws_per_class(batches, labels):
    """{label: that class's indices in draw order, concatenated over the batches}."""
    draws = collections.defaultdict(list)
    for batch in batches:
        for i in batch:
            draws[int(labels[i])].append(i)
    return draws


def _assert_counts_stay_level(draws, members):
    """Every sample before any repeat: at every prefix of the class's draw sequence the
    per-sample draw counts differ by at most one (so the i-th draw of a sample never
    comes before every sample of the class has been drawn i - 1 times)."""
    counts = dict.fromkeys(members, 0)
    for step, i in enumerate(draws):
        assert i in counts, f"index {i} is not of this class"
        counts[i] += 1
        spread = max(counts.values()) - min(counts.values())
        assert spread <= 1, f"after {step + 1} draws counts are {counts} (a repeat before an unseen sample)"


def test_every_sample_before_any_repeat_when_m_does_not_divide_the_class_size():
    labels = [0] * 5 + [1] * 5
    batches = list(ClassBalancedBatchSampler(labels, 2, 2, num_batches=4, seed=0))
    draws = _draws_per_class(batches, labels)
    for c, members in ((0, range(0, 5)), (1, range(5, 10))):
        assert len(draws[c]) == 8
        assert sorted(draws[c][:5]) == list(members)  # the first 5 draws: all 5 samples
        _assert_counts_stay_level(draws[c], members)
    for batch in batches:
        assert len(set(batch)) == len(batch)


def test_no_seed_leaves_a_sample_unseen_after_one_pass():
    labels = [0] * 5 + [1] * 5
    draws_per_pass = -(-5 // 2) * 2  # ceil(5 / 2) draws of 2 = 6
    unseen = 0
    for seed in range(200):
        batches = list(ClassBalancedBatchSampler(labels, 2, 2, num_batches=draws_per_pass // 2, seed=seed))
        draws = _draws_per_class(batches, labels)
        unseen += any(len(set(draws[c][:draws_per_pass])) < 5 for c in (0, 1))
    assert unseen == 0


def test_carried_remainder_skips_indices_already_in_the_draw():
    # 3 samples, m = 2: the second draw takes the 1 leftover and one index of the next
    # pass that differs from it; the skipped one opens the next draw.
    labels = [0] * 3 + [1] * 3
    for seed in range(50):
        sampler = ClassBalancedBatchSampler(labels, 2, 2, num_batches=30, seed=seed)
        draws = _draws_per_class(list(sampler), labels)
        for c, members in ((0, range(0, 3)), (1, range(3, 6))):
            _assert_counts_stay_level(draws[c], members)
            groups = [draws[c][j:j + 2] for j in range(0, len(draws[c]), 2)]
            assert all(g[0] != g[1] for g in groups)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 13), min_size=2, max_size=5),
    m=st.integers(1, 6),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_draw_counts_stay_level_and_batches_hold_no_duplicates(sizes, m, data, seed):
    k = data.draw(st.integers(1, len(sizes)), label="classes_per_batch")
    num_batches = data.draw(st.integers(1, 40), label="num_batches")
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    starts = [sum(sizes[:c]) for c in range(len(sizes))]
    batches = list(ClassBalancedBatchSampler(labels, k, m, num_batches=num_batches, seed=seed))
    assert batches == list(ClassBalancedBatchSampler(labels, k, m, num_batches=num_batches, seed=seed))
    draws = _draws_per_class(batches, labels)
    for c, n in enumerate(sizes):
        if n < m:  # small class: documented as drawn with replacement
            continue
        members = range(starts[c], starts[c] + n)
        _assert_counts_stay_level(draws[c], members)
        for batch in batches:
            group = [i for i in batch if labels[i] == c]
            assert len(group) in (0, m)
            assert len(set(group)) == len(group)


def test_seed_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"seed must be in .*got 1180591620717411303424"):
        ClassBalancedBatchSampler([0] * 5 + [1] * 5, 2, 2, seed=2**70)
