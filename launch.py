"""Runs the lsot_jax pipeline: autoencoder -> encode -> latent OT -> sample -> eval -> report.

Usage:
  python launch.py --config configs/mnist.py --workdir runs/mnist
  python launch.py --config configs/eight_gaussians.py:smoke --workdir /tmp/ring --config.seed=1
  python launch.py --config configs/mnist.py --workdir runs/mnist --stage report

Any config field can be overridden with ``--config.<section>.<field>=value``; unknown fields and wrong types
fail before any work starts. Expected failures (missing data, a workdir holding another config, divergence,
an unreadable checkpoint) print one actionable message and exit with status 1.

Hyperparameter scans (``--scan``, repeatable): every combination of the given values of the OT solver's
fields (``ot.<field>``) and of ``seed`` (the solver's key) is fitted in one vmapped, jitted call per group of
static settings, on the codes of this workdir (the ae and encode stages run first if they are not finished)::

  python launch.py --config configs/eight_gaussians.py:smoke --workdir /tmp/ring \\
      --scan ot.learning_rate=0.3,1.0,3.0 --scan seed=0,1,2

writes ``<workdir>/scan/scan.csv``, ``scan.md`` (printed too) and ``scan.png``: per setting, the final L1
marginal error on ``ot.marginal_samples`` source points and quality metrics of its ``exact`` samples. The
scan leaves the ot stage and later stages alone: a normal run in the same workdir afterwards continues as usual.

Autoencoder training fields may be scanned too (not with ``ae.kind=identity``): ``ae.learning_rate``,
``ae.weight_decay`` and ``ae.code_penalty`` (traced) and ``ae.epochs``, ``ae.batch_size``, ``ae.lr_schedule``
(static: one training per group). One autoencoder per setting (``seed`` then also seeds its init and data
order) is trained in memory, all of a group at once in one vmapped, jitted loop (S settings cost S times one
training's memory: for small models), each setting's potential is fitted on its own codes, and the rows add
``ae_loss``, ``ae_test_mse`` and data-space quality of the decoded ``exact`` samples (toys: modes; images:
pixel-space Frechet distance, precision and recall); the workdir's stages are not touched::

  python launch.py --config configs/digits.py:smoke --workdir /tmp/digits \\
      --scan ae.learning_rate=1e-3,3e-3 --scan seed=0,1 --scan ot.learning_rate=0.5,1.0

Several devices: ``--config.ot.num_devices=N`` shards the codes of the OT fit over N devices (0: all),
``--config.ae.num_devices=N`` trains the autoencoder data-parallel; both may change between reruns.

Multi-host (several processes, e.g. one per GPU host): start the same command on every host with

  --coordinator_address=HOST0:PORT --num_processes=P --process_id=I      (I = 0 .. P-1)

``jax.distributed.initialize`` is then called with them before any other JAX call, and ``jax.devices()``
(hence ``num_devices=0``) spans every host's devices. On TPU pods and SLURM / Open MPI clusters JAX can detect
the three values itself: pass ``--distributed`` alone. ``--num_processes=1`` (the default) starts nothing.
Every process needs the same data and config, and the same ``--workdir`` on a shared file system.
"""
import sys
from typing import Any, Dict, Optional

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lsot_jax import checkpoint
from lsot_jax import data
from lsot_jax import pipeline
from lsot_jax import sharding
from lsot_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/mnist.py or configs/mnist.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, samples, metrics, report).")
_STAGE = flags.DEFINE_enum("stage", None, list(pipeline.STAGES),
                           "Run this stage only (the earlier ones must be finished); default: all.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False,
                                  "Move an existing run in --workdir aside (never deleted) and start afresh.")
_SCAN = flags.DEFINE_multi_string(
    "scan", None, "Scan instead of running the pipeline: 'field=v1,v2,...' with field 'seed', "
    "'ot.<solver field>' or an autoencoder training field (ae.learning_rate, ae.weight_decay, "
    "ae.code_penalty, ae.epochs, ae.batch_size, ae.lr_schedule: one autoencoder per setting, trained in "
    "memory, vmapped); repeat the flag to scan combinations. Outputs go to <workdir>/scan/.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: 'host:port' of process 0, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Multi-host: call jax.distributed.initialize even without the three flags above "
    "(TPU pods, SLURM and Open MPI clusters, where JAX detects them).")
flags.mark_flags_as_required(["config", "workdir"])

_EXPECTED = (pipeline.PipelineError, data.DataNotFoundError, data.DataCorruptError, train.TrainingDiverged,
             checkpoint.CheckpointError)


def distributed_settings(coordinator_address: Optional[str], num_processes: Optional[int],
                         process_id: Optional[int], auto: bool = False) -> Optional[Dict[str, Any]]:
  """Checks the multi-host flags and returns the ``jax.distributed.initialize`` arguments, or None.

  Args:
    coordinator_address: ``--coordinator_address``.
    num_processes: ``--num_processes``.
    process_id: ``--process_id``.
    auto: ``--distributed``: initialise even with no other flag (cluster auto-detection).

  Returns:
    Keyword arguments for :func:`lsot_jax.sharding.initialize_distributed`, or None for a single process
    (no flag given, or ``num_processes == 1``).

  Raises:
    app.UsageError: an inconsistent combination, naming the flags.
  """
  given = [coordinator_address, num_processes, process_id]
  if num_processes is not None and num_processes < 1:
    raise app.UsageError(f"--num_processes must be >= 1; got {num_processes}.")
  if process_id is not None and process_id < 0:
    raise app.UsageError(f"--process_id must be >= 0; got {process_id}.")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise app.UsageError(f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}; "
                         f"got {process_id}.")
  if num_processes == 1:
    if coordinator_address is not None:
      raise app.UsageError("--coordinator_address is for several processes; drop it with --num_processes=1.")
    return None
  if all(v is None for v in given) and not auto:
    return None
  if not auto and not (coordinator_address and num_processes is not None and process_id is not None):
    raise app.UsageError("Multi-host needs all of --coordinator_address, --num_processes and --process_id "
                         "(or --distributed alone where JAX detects them: TPU pods, SLURM, Open MPI).")
  return dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _SCAN.value and _STAGE.value:
    raise app.UsageError("--scan runs the stages it needs (ae, encode) itself; drop --stage.")
  distributed = distributed_settings(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                     _DISTRIBUTED.value)
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every save; TFDS warns on probes.
  log = lambda line: print(line, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  if distributed is not None:
    try:  # Before any other JAX call.
      sharding.initialize_distributed(**distributed)
    except (RuntimeError, ValueError) as e:
      print(f"launch.py: error: jax.distributed.initialize failed ({distributed}): {e}", file=sys.stderr,
            flush=True)
      return 1
  try:
    if _SCAN.value:
      result = pipeline.run_scan(_CONFIG.value, _WORKDIR.value, _SCAN.value, log=log,
                                 overwrite=_OVERWRITE.value)
      with open(result.files["md"]) as f:
        print(f.read(), end="", flush=True)
      return 0
    metrics = pipeline.run(_CONFIG.value, _WORKDIR.value, stage=_STAGE.value, overwrite=_OVERWRITE.value,
                           log=log)
  except _EXPECTED as e:
    print(f"launch.py: error: {e}", file=sys.stderr, flush=True)
    return 1
  if metrics is not None:
    print(f"metrics: {_WORKDIR.value}/metrics.json, report: {_WORKDIR.value}/report.md", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
