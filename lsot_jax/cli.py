"""The ``lsot-jax`` command: autoencoder -> encode -> latent OT -> sample -> eval -> report.

Usage (``pip install .`` installs the ``lsot-jax`` command; in a source checkout ``python launch.py`` takes
the same flags):
  lsot-jax --config mnist --workdir runs/mnist
  lsot-jax --config eight_gaussians:smoke --workdir /tmp/ring --config.seed=1
  lsot-jax --config mnist --workdir runs/mnist --stage report
  lsot-jax --workdir runs/mnist --stage generate --method extended --num_samples 10000 --sample_seed 0
  python launch.py --config configs/mnist.py --workdir runs/mnist

``--config`` takes the name of a shipped config (``eight_gaussians``, ``grid25``, ``digits``, ``mnist``,
``fashion_mnist``, ``celeba``; see :mod:`lsot_jax.config_files` for where they are found) or the path of a
config file, either optionally followed by ``:ARG`` for its ``get_config`` (``mnist:smoke``,
``configs/mnist.py:smoke``).

Any config field can be overridden with ``--config.<section>.<field>=value``; unknown fields and wrong types
fail before any work starts. Expected failures (missing data, a workdir holding another config, divergence,
an unreadable checkpoint) print one actionable message and exit with status 1.

Hyperparameter scans (``--scan``, repeatable): every combination of the given values of the OT solver's
fields (``ot.<field>``) and of ``seed`` (the solver's key) is fitted in one vmapped, jitted call per group of
static settings, on the codes of this workdir (the ae and encode stages run first if they are not finished)::

  lsot-jax --config eight_gaussians:smoke --workdir /tmp/ring \\
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

  lsot-jax --config digits:smoke --workdir /tmp/digits \\
      --scan ae.learning_rate=1e-3,3e-3 --scan seed=0,1 --scan ot.learning_rate=0.5,1.0

Several devices: ``--config.ot.num_devices=N`` shards the codes of the OT fit over N devices (0: all),
``--config.ae.num_devices=N`` trains the autoencoder data-parallel; both may change between reruns.

Multi-host (several processes, e.g. one per GPU host): start the same command on every host with

  --coordinator_address=HOST0:PORT --num_processes=P --process_id=I      (I = 0 .. P-1)

``jax.distributed.initialize`` is then called with them before any other JAX call, and ``jax.devices()``
(hence ``num_devices=0``) spans every host's devices. On TPU pods and SLURM / Open MPI clusters JAX can detect
the three values itself: pass ``--distributed`` alone. ``--num_processes=1`` (the default) starts nothing.
Every process needs the same data and config, and the same ``--workdir`` on a shared file system.

``--help`` (also ``-h``, ``--helpshort``, ``-?``) prints this text and the flags and exits with status 0;
``--helpfull`` lists every absl flag. Importing this module defines its flags in ``absl.flags.FLAGS``.
"""
import os
import sys
from typing import Any, Dict, List, NoReturn, Optional, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lsot_jax import checkpoint
from lsot_jax import config_files
from lsot_jax import data
from lsot_jax import pipeline
from lsot_jax import runs
from lsot_jax import sharding
from lsot_jax import train

__all__ = ["distributed_settings", "main", "run", "usage"]


class _ConfigNameParser(flags.ArgumentParser):
  """Wraps ml_collections' config file parser so that it also takes a shipped config's name (``mnist:smoke``).

  Attributes:
    file_parser: the parser that ``config_flags.DEFINE_config_file`` gave the flag.
  """

  def __init__(self, file_parser: flags.ArgumentParser):
    self.file_parser = file_parser

  def parse(self, argument):
    return self.file_parser.parse(config_files.resolve(argument))

  def flag_type(self):
    return self.file_parser.flag_type()


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config's name or a config file, optionally with an argument for its "
    "get_config: mnist, mnist:smoke, configs/mnist.py:smoke. Shipped: eight_gaussians, grid25, digits, "
    "mnist, fashion_mnist, celeba.", lock_config=True)
flags.FLAGS[_CONFIG.name].parser = _ConfigNameParser(flags.FLAGS[_CONFIG.name].parser)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, samples, metrics, report).")
_GENERATE = "generate"
_STAGE = flags.DEFINE_enum("stage", None, list(pipeline.STAGES) + [_GENERATE],
                           "Run this stage only (the earlier ones must be finished); default: all. 'generate' "
                           "(not a pipeline stage) writes --num_samples decoded samples of --method to "
                           "<workdir>/generated/<method>_seed<S>_n<N>/ (samples.npz; png/ for images) from a "
                           "finished ot stage, touching no stage; --config is then optional (the run's "
                           "config.json is read; a given one must match it).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "--stage generate: samples to write (default: the "
                                    "run's sample.num_samples).", lower_bound=1)
_METHOD = flags.DEFINE_enum("method", "extended", list(pipeline.LSOT_METHODS),
                            "--stage generate: the LSOT generation method.")
_SAMPLE_SEED = flags.DEFINE_integer("sample_seed", 0, "--stage generate: the sample seed S (seed S of the "
                                    "sample stage's draws).", lower_bound=0)
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
flags.mark_flags_as_required(["workdir"])
flags.register_multi_flags_validator(
    ["config", "stage"], lambda values: values["config"] is not None or values["stage"] == _GENERATE,
    message="--config is required (only --stage generate reads the run's own config.json).")

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


def run(argv: Sequence[str]) -> int:
  """Runs the pipeline (or a scan) for the parsed flags: the ``main`` that absl's ``app.run`` calls.

  Args:
    argv: the arguments absl left after parsing the flags; only the program name, ``argv[0]``, is
      expected (it prefixes the error messages).

  Returns:
    The exit status: 0, or 1 after an expected failure (printed as one line on stderr).

  Raises:
    app.UsageError: leftover arguments or inconsistent flags.
  """
  prog = os.path.basename(argv[0]) if argv else "lsot-jax"
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _SCAN.value and _STAGE.value:
    raise app.UsageError("--scan runs the stages it needs (ae, encode) itself; drop --stage.")
  if _STAGE.value == _GENERATE and _OVERWRITE.value:
    raise app.UsageError("--stage generate writes only under <workdir>/generated/; drop --overwrite.")
  distributed = distributed_settings(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                     _DISTRIBUTED.value)
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax logs every save; TFDS warns on probes.
  log = lambda line: print(line, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  if distributed is not None:
    try:  # Before any other JAX call.
      sharding.initialize_distributed(**distributed)
    except (RuntimeError, ValueError) as e:
      print(f"{prog}: error: jax.distributed.initialize failed ({distributed}): {e}", file=sys.stderr,
            flush=True)
      return 1
  try:
    if _SCAN.value:
      result = pipeline.run_scan(_CONFIG.value, _WORKDIR.value, _SCAN.value, log=log,
                                 overwrite=_OVERWRITE.value)
      with open(result.files["md"]) as f:
        print(f.read(), end="", flush=True)
      return 0
    if _STAGE.value == _GENERATE:
      out = runs.write_generated(runs.load_run(_WORKDIR.value, config=_CONFIG.value), _METHOD.value,
                                 _NUM_SAMPLES.value, _SAMPLE_SEED.value)
      log(f"generate: wrote {out}")
      return 0
    metrics = pipeline.run(_CONFIG.value, _WORKDIR.value, stage=_STAGE.value, overwrite=_OVERWRITE.value,
                           log=log)
  except _EXPECTED as e:
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return 1
  if metrics is not None:
    print(f"metrics: {_WORKDIR.value}/metrics.json, report: {_WORKDIR.value}/report.md", flush=True)
  return 0


_HELP_ARGS = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h")


def usage(prog: str = "lsot-jax") -> str:
  """The ``--help`` text: this module's docstring and its flags.

  Args:
    prog: the program name shown in the first line.

  Returns:
    The text.
  """
  return (f"USAGE: {prog} --config NAME[:ARG] --workdir DIR [flags]\n\n{__doc__.strip()}\n\nFlags:\n"
          f"{flags.FLAGS.module_help(__name__)}\n\nTry --helpfull to get a list of all flags.")


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
  """Entry point of the ``lsot-jax`` console script and of ``launch.py``.

  Parses the flags with absl and calls :func:`run` (``absl.app.run``), or prints :func:`usage` for
  ``--help``. ml_collections reads the ``--config.*`` overrides from ``sys.argv``, so an explicit ``argv``
  stands in for ``sys.argv`` during the call.

  Args:
    argv: the command line, program name first; ``sys.argv`` if None.

  Raises:
    SystemExit: always, with :func:`run`'s status (0 after ``--help``; 1 for flag errors).
  """
  argv = list(sys.argv if argv is None else argv)
  options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(arg in _HELP_ARGS for arg in options):
    print(usage(os.path.basename(argv[0]) if argv else "lsot-jax"), flush=True)
    raise SystemExit(0)
  saved = sys.argv
  sys.argv = argv
  try:
    app.run(run, argv=argv, flags_parser=_parse_flags)
  finally:
    sys.argv = saved


def _parse_flags(argv: Sequence[str]) -> List[str]:
  """absl's flag parsing, with an unknown or mistyped ``--config.*`` field as one line and exit status 1.

  ml_collections raises ``AttributeError`` / ``KeyError`` (with its did-you-mean hint) for a field the config
  does not have, and absl a ``flags.Error`` for a value of the wrong type; both would otherwise end in a
  traceback.
  """
  prog = os.path.basename(argv[0]) if argv else "lsot-jax"
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:
    message = f"unknown config field: {str(e).strip(chr(34))}"
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  print(f"{prog}: error: {message} (config overrides given: {', '.join(overrides) or 'none'}; "
        f"`{prog} --help` lists the flags, and the config module's docstring its fields)", file=sys.stderr,
        flush=True)
  raise SystemExit(1)
