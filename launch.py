"""Runs the lsot_jax pipeline: autoencoder -> encode -> latent OT -> sample -> eval -> report.

Usage:
  python launch.py --config configs/mnist.py --workdir runs/mnist
  python launch.py --config configs/eight_gaussians.py:smoke --workdir /tmp/ring --config.seed=1
  python launch.py --config configs/mnist.py --workdir runs/mnist --stage report

Any config field can be overridden with ``--config.<section>.<field>=value``; unknown fields and wrong types
fail before any work starts. Expected failures (missing data, a workdir holding another config, divergence,
an unreadable checkpoint) print one actionable message and exit with status 1.
"""
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lsot_jax import checkpoint
from lsot_jax import data
from lsot_jax import pipeline
from lsot_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/mnist.py or configs/mnist.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, samples, metrics, report).")
_STAGE = flags.DEFINE_enum("stage", None, list(pipeline.STAGES),
                           "Run this stage only (the earlier ones must be finished); default: all.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "Move an existing run in --workdir aside (never deleted) and start afresh.")
flags.mark_flags_as_required(["config", "workdir"])

_EXPECTED = (pipeline.PipelineError, data.DataNotFoundError, data.DataCorruptError, train.TrainingDiverged,
             checkpoint.CheckpointError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every save; TFDS warns on probes.
  try:
    metrics = pipeline.run(_CONFIG.value, _WORKDIR.value, stage=_STAGE.value, overwrite=_OVERWRITE.value,
                           log=lambda line: print(line, flush=True))
  except _EXPECTED as e:
    print(f"launch.py: error: {e}", file=sys.stderr, flush=True)
    return 1
  if metrics is not None:
    print(f"metrics: {_WORKDIR.value}/metrics.json, report: {_WORKDIR.value}/report.md", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
