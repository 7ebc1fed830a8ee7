r"""Fashion-MNIST from TFDS (array_record, no TensorFlow needed to read): the MNIST recipe on clothes.

Prepare the data once on a machine with internet access (TFDS needs TensorFlow to build it):
  tfds build fashion_mnist --file_format=array_record --data_dir=DIR
then copy DIR here and pass ``--config.data.data_dir=DIR`` (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
Without the data the run stops within seconds printing that command.

Command:
  python launch.py --config configs/fashion_mnist.py --workdir runs/fashion --config.data.data_dir=DIR
  python launch.py --config configs/fashion_mnist.py:smoke --workdir /tmp/fashion_smoke

Expected runtime (2-core CPU): about as long as configs/mnist.py (about 15 minutes); not measured (no
Fashion-MNIST copy on the build machine: it has no internet access to build one with TFDS).
Expected metrics: not measured yet (no Fashion-MNIST copy on the build machine, as above; the tests run this
config only on tfds.testing.mock_data, whose random images give no meaningful metrics).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  """The Fashion-MNIST config; ``arg="smoke"`` shrinks it to about a minute."""
  config = mnist.get_config(arg)
  config.data.name = "fashion_mnist"
  return config
