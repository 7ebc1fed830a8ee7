"""A finished pipeline run as a generative model: :func:`load_run`, and the ``--stage generate`` writer.

``load_run(workdir)`` rebuilds the run's config from ``<workdir>/config.json``, restores the trained
autoencoder from the ae stage's Orbax checkpoint and the fitted Brenier potential from the ot stage's
(nothing is trained, nothing in the workdir is written), and samples with the settings of the sample stage::

  run = lsot_jax.load_run("runs/mnist")
  images = run.sample(jax.random.key(0), 16, method="extended")      # [16, 28, 28, 1] in [0, 1]

:func:`write_generated` (``lsot-jax --stage generate``) writes samples of one method and seed to
``<workdir>/generated/<method>_seed<S>_n<N>/``: ``samples.npz`` (array ``samples``) and, for image data, one
uint8 PNG per sample in ``png/``, the folder format clean-fid and torch-fidelity read. ``generated/`` is not a
pipeline stage: it is never checked against the config, and no stage's folder is touched.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
from PIL import Image

from lsot_jax import data as data_lib
from lsot_jax import generate
from lsot_jax import artifacts
from lsot_jax import config as config_lib
from lsot_jax import pipeline
from lsot_jax import samplers
from lsot_jax import solver as solver_lib
from lsot_jax import sources
from lsot_jax import workdir as workdir_lib
from lsot_jax.config import config_from_dict

__all__ = ["GENERATED_DIR", "Run", "config_from_dict", "load_run", "write_generated"]

GENERATED_DIR = "generated"


def _stage_error(workdir: pathlib.Path, stage: str) -> config_lib.PipelineError:
  return config_lib.PipelineError(
      f"The run in {workdir} has no finished {stage!r} stage; finish it with: lsot-jax --config <the run's "
      f"config> --workdir {workdir} --stage {stage} (or without --stage to run every stage).")


class Run:
  """A finished run: its config, autoencoder and potential (restored lazily, each when first used).

  Attributes:
    config: the run's config (``ml_collections.ConfigDict``).
    workdir: the run folder (absolute).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
    self.config = config
    self.workdir = workdir
    self._wd = workdir_lib.Workdir(workdir)
    self._samplers: Dict[Tuple[str, int], Callable[[jax.Array], jax.Array]] = {}

  def require_stage(self, stage: str) -> None:
    """Raises :class:`lsot_jax.config.PipelineError` (naming the stage and its command) unless ``stage``
    is finished."""
    if not self._wd.is_done(stage):
      raise _stage_error(self.workdir, stage)

  @property
  def is_image(self) -> bool:
    """Whether the data are images (decoded samples [n, H, W, C]) rather than points ([n, D])."""
    return self.config.data.name not in data_lib.TOY_NAMES

  @functools.cached_property
  def autoencoder(self) -> artifacts.Autoencoder:
    """The trained autoencoder (restored from the ae stage's checkpoint; the identity for toys).

    Raises:
      PipelineError: the ae stage is not finished.
    """
    self.require_stage("ae")
    return self._wd.load_autoencoder(self.config)

  def encode(self, x: Any) -> np.ndarray:
    """Latent codes of data.

    Args:
      x: array of shape [M, *example_shape] (images in [0, 1], or points).

    Returns:
      float32 array of shape [M, d] (``x`` itself for ``ae.kind == "identity"``).

    Raises:
      PipelineError: the ae stage is not finished.
    """
    return self.autoencoder.encode(x)

  def decode(self, z: Any) -> np.ndarray:
    """Data of latent codes.

    Args:
      z: array of shape [M, d].

    Returns:
      float32 array of shape [M, *example_shape]: images in [0, 1], or points (``z`` itself for
      ``ae.kind == "identity"``).

    Raises:
      PipelineError: the ae stage is not finished.
    """
    return self.autoencoder.decode(z)

  @functools.cached_property
  def potential(self) -> solver_lib.BrenierPotential:
    """The fitted Brenier potential (y [n, d], the OT codes; h [n]), as :func:`pipeline.load_potential`.

    Raises:
      PipelineError: the encode or ot stage is not finished.
    """
    for stage in ("encode", "ot"):
      self.require_stage(stage)
    return pipeline.load_potential(self.config, self.workdir)

  @functools.cached_property
  def source(self) -> Any:
    """The source measure of the fit (``ot.source`` in the latent dimension d)."""
    return sources.make_source(self.config.ot.source, int(self.potential.y.shape[1]))

  def sample_codes(self, key: jax.Array, n: int, method: str = "extended") -> np.ndarray:
    """Latent codes from the potential, with the sample stage's settings for ``method``.

    Args:
      key: PRNG key; :func:`lsot_jax.config.sample_key` gives the sample stage's keys.
      n: number of samples.
      method: ``"exact"``, ``"extended"`` or ``"soft"`` (:data:`lsot_jax.config.LSOT_METHODS`).

    Returns:
      float32 array of shape [n, d].

    Raises:
      PipelineError: an unknown method, or an unfinished encode or ot stage.
    """
    if method not in config_lib.LSOT_METHODS:
      raise config_lib.PipelineError(f"Unknown method {method!r}; valid: {', '.join(config_lib.LSOT_METHODS)}.")
    if (method, int(n)) not in self._samplers:
      potential, source, num = self.potential, self.source, int(n)
      kwargs = samplers.lsot_generate_kwargs(self.config, method, potential, source)
      self._samplers[method, num] = jax.jit(
          lambda k, y, h: generate.generate(method, k, source, y, h, num, **kwargs))
    potential = self.potential
    return np.asarray(self._samplers[method, int(n)](key, potential.y, potential.h), np.float32)

  def sample(self, key: jax.Array, n: int, method: str = "extended") -> np.ndarray:
    """Decoded samples: :meth:`sample_codes` through :meth:`decode`.

    Args:
      key: PRNG key.
      n: number of samples.
      method: ``"exact"``, ``"extended"`` or ``"soft"``.

    Returns:
      float32 array of shape [n, *example_shape]: images [n, H, W, C] in [0, 1], or points [n, D].

    Raises:
      PipelineError: an unknown method, or an unfinished ae, encode or ot stage.
    """
    self.require_stage("ae")
    return self.decode(self.sample_codes(key, n, method))


def load_run(workdir: str | os.PathLike, config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """Opens a pipeline run for encoding, decoding and sampling; trains nothing and writes nothing.

  Args:
    workdir: the run folder (``--workdir`` of the run).
    config: None reads the run's ``config.json`` (device counts above what this process sees are lowered,
      as device counts are locations, not part of the run); a given config must match the stored one, as a
      rerun's must.

  Returns:
    A :class:`Run`. Its stages' checkpoints are restored when first used; an unfinished stage raises
    :class:`lsot_jax.config.PipelineError` naming it and the command that finishes it.

  Raises:
    PipelineError: no run in ``workdir``, an unreadable ``config.json``, or (``config`` given) a
      :class:`lsot_jax.config.ConfigMismatchError`.
  """
  path = pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(workdir))))
  config_path = path / "config.json"
  if not config_path.is_file():
    raise config_lib.PipelineError(f"{path} holds no pipeline run (no config.json); run lsot-jax --config "
                                 f"CONFIG --workdir {path} first.")
  if config is None:
    try:
      stored = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
      raise config_lib.PipelineError(f"{config_path} is unreadable: {e}") from e
    config = config_from_dict(stored)
    available = len(jax.devices())
    for section in ("ae", "ot"):
      if config[section].num_devices > available:
        config[section].num_devices = available
  pipeline.check_run(config, path)
  return Run(config, path)


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """Images [n, H, W, C] in [0, 1] as uint8 [n, H, W] (C = 1) or [n, H, W, 3], rounded as the grids are."""
  out = (np.clip(np.nan_to_num(np.asarray(images, np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  return out[..., 0] if out.shape[-1] == 1 else out


def write_generated(run: Run, method: str = "extended", num_samples: Optional[int] = None,
                    seed: int = 0) -> pathlib.Path:
  """Writes decoded samples of one method and sample seed under ``<workdir>/generated/``.

  The codes are those of the sample stage's seed ``seed`` (key :func:`lsot_jax.config.sample_key`), so
  with ``num_samples = sample.num_samples`` and a seed below ``sample.num_seeds`` they equal the sample
  stage's.

  Args:
    run: from :func:`load_run`.
    method: ``"exact"``, ``"extended"`` or ``"soft"``.
    num_samples: N; None: the run's ``sample.num_samples``.
    seed: the sample seed S (>= 0).

  Returns:
    The folder ``<workdir>/generated/<method>_seed<S>_n<N>``, holding ``samples.npz`` (float32 array
    ``samples`` [N, *example_shape]) and, for image data, ``png/000000.png`` ... (uint8, grayscale for one
    channel, RGB for three).

  Raises:
    PipelineError: an unfinished ae, encode or ot stage, an unknown method, or N or S out of range.
  """
  n = int(run.config.sample.num_samples if num_samples is None else num_samples)
  if n < 1 or int(seed) < 0:
    raise config_lib.PipelineError(f"--num_samples must be >= 1 and --sample_seed >= 0; got {n} and {seed}.")
  for stage in ("ae", "encode", "ot"):
    run.require_stage(stage)
  samples = run.sample(config_lib.sample_key(run.config, method, int(seed)), n, method)
  out = run.workdir / GENERATED_DIR / f"{method}_seed{int(seed)}_n{n}"
  out.mkdir(parents=True, exist_ok=True)
  np.savez(out / "samples.npz", samples=samples)
  if run.is_image:
    png = out / "png"
    png.mkdir(exist_ok=True)
    width = max(6, len(str(n - 1)))
    for i, image in enumerate(_to_uint8(samples)):
      Image.fromarray(image).save(png / f"{i:0{width}d}.png")
  return out
