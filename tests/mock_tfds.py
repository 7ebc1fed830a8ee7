"""``tfds.testing.mock_data`` for the tests that read TFDS sets: random examples with the real datasets'
features and splits, served to ``tfds.data_source`` (both the in-memory loader and the streams read it).

tfds 4.9.10 installs the mock data source's ``__getitems__`` as an unbound partial; :class:`BoundGetitemsMock`
binds it to the mock.
"""
import functools

import tensorflow_datasets as tfds


class BoundGetitemsMock(tfds.testing.PickableDataSourceMock):
  """Binds the mock's ``__getitems__`` partial to the mock (tfds 4.9.10 bug)."""

  def __setattr__(self, name, value):
    if name == "__getitems__" and isinstance(value, functools.partial):
      value = functools.partial(value, self)
    super().__setattr__(name, value)


def mock_data(num_examples: int):
  """The context manager of ``num_examples`` random examples per split of every TFDS set (code policy)."""
  return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE,
                                mock_array_record_data_source=BoundGetitemsMock())
