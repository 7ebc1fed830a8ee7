"""Tests for lsot_jax.feeds: the in-memory and streamed feeds give the same batches per training step, and a
stream's position moves through a checkpoint's metadata. Reference: the rows of the arrays gathered by
``train.epoch_permutation`` written out here."""
import json

import numpy as np
import pytest

from lsot_jax import feeds
from lsot_jax import streaming
from lsot_jax import train


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return rng.normal(size=(53, 3, 2)).astype(np.float32), rng.integers(0, 5, 53).astype(np.int32)


def _cfg(**kw):
  return train.TrainConfig(**{"seed": 4, "epochs": 3, "batch_size": 10, **kw})


def test_array_and_stream_feeds_give_the_permuted_rows_of_every_step(data):
  x, labels = data
  cfg = _cfg()
  array_feed = feeds.make_feed("t", (x, labels), cfg)
  stream = feeds.training_stream(streaming.array_source(x, labels), cfg, num_threads=2)
  stream_feed = feeds.make_feed("t", stream, cfg, keys=("image", "label"))
  assert array_feed.steps_per_epoch == stream_feed.steps_per_epoch == 5
  assert array_feed.num_examples == stream_feed.num_examples == 53
  assert array_feed.batch_size == stream_feed.batch_size == 10
  for step in range(15):
    epoch, pos = divmod(step, 5)
    idx = train.epoch_permutation(4, epoch, 53)[pos * 10:(pos + 1) * 10]
    for feed in (array_feed, stream_feed):
      got_x, got_labels = feed.batch(step)
      np.testing.assert_array_equal(got_x, x[idx])
      np.testing.assert_array_equal(got_labels, labels[idx])
  with pytest.raises(ValueError, match="ended at batch 15"):
    stream_feed.batch(15)


def test_stream_position_round_trips_through_json_and_is_checked(data):
  x, _ = data
  cfg = _cfg()
  source = streaming.array_source(x)
  feed = feeds.make_feed("t", feeds.training_stream(source, cfg), cfg)
  for step in range(7):
    feed.batch(step)
  state = json.loads(json.dumps(feed.state()))
  fresh = feeds.make_feed("t", feeds.training_stream(source, cfg), cfg)
  fresh.restore(7, state)
  np.testing.assert_array_equal(fresh.batch(7)[0], feed.batch(7)[0])
  with pytest.raises(ValueError, match="at batch 8, not at step 9"):
    fresh.batch(9)
  with pytest.raises(ValueError, match="state at batch 7"):
    feeds.make_feed("t", feeds.training_stream(source, cfg), cfg).restore(6, state)
  # No stream state (a checkpoint of in-memory training): the stream is read up to the step.
  skipped = feeds.make_feed("t", feeds.training_stream(source, cfg), cfg)
  skipped.restore(7, None)
  np.testing.assert_array_equal(skipped.batch(7)[0], feeds.make_feed("t", (x,), cfg).batch(7)[0])
  with pytest.raises(ValueError, match="seed: saved 4, here 5"):
    other = _cfg(seed=5)
    feeds.make_feed("t", feeds.training_stream(source, other), other).restore(7, state)


def test_bad_training_data_is_refused_naming_it(data):
  x, labels = data
  with pytest.raises(ValueError, match="same length"):
    feeds.make_feed("ae", (x, labels[:3]), _cfg())
  with pytest.raises(ValueError, match="x_train must have shape"):
    feeds.training_data(x, (3, 3), "x_train")
  with pytest.raises(ValueError, match="has no labels"):
    feeds.make_feed("ae", feeds.training_stream(streaming.array_source(x), _cfg()), _cfg(),
                    keys=("image", "label"))
