"""batches.py: length-grouped batches. (The windows of C4, which a run moves through, are tested with the
run in test_train.py.)"""
import random

from batches import Batches


def test_batches_are_deterministic_length_grouped_and_cover_the_epoch():
    lengths = [random.Random(i).randint(1, 60) for i in range(400)]
    b = Batches(lengths, 50, seed=1)
    assert [x.tolist() for x in b.epoch(0)] == [x.tolist() for x in Batches(lengths, 50, seed=1).epoch(0)]
    flat = sorted(i for batch in b.epoch(0) for i in batch.tolist())
    assert flat == list(range(400))
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in b.epoch(0)) / 8
    assert spread < 30  # random batches of 50 would span ~55
    assert b.get(8)[0] in b.epoch(1)[0]
