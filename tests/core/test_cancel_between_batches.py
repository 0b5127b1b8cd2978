"""A cancel stops a training run between batches, not at the end of a (long) epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # fits a (tiny) Keras model


def test_a_cancel_stops_fit_at_the_next_batch_and_the_epoch_does_not_finish() -> None:
    import keras

    from ctscan.training.callbacks import CancelBetweenBatches
    from ctscan.training.runs import TrainingCancelled

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    batches: list[int] = []
    epochs_ended: list[int] = []

    class Count(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            batches.append(batch)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            epochs_ended.append(epoch)

    cancelled_after = 3  # the admin's cancel arrives while batch 3 of 50 runs
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(len(batches))
        return len(batches) >= cancelled_after

    x = np.random.default_rng(0).normal(size=(200, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    with pytest.raises(TrainingCancelled, match="during batch 3"):
        model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                  callbacks=[Count(), CancelBetweenBatches(should_stop, cancelled=TrainingCancelled, poll_s=0.0)])
    assert len(batches) == cancelled_after and epochs_ended == []  # stopped inside the first epoch


def test_the_cancel_flag_is_read_at_most_once_per_poll_interval() -> None:
    from ctscan.training.callbacks import CancelBetweenBatches

    reads: list[int] = []
    callback = CancelBetweenBatches(lambda: bool(reads.append(1)), cancelled=RuntimeError, poll_s=3600.0)
    for batch in range(100):
        callback.on_train_batch_end(batch)
    assert len(reads) == 1  # one store read, not one per batch
