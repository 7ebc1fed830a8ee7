"""The generators of the sample stage: a registry from method name to sampler builder.

A builder takes :class:`SamplerInputs` (the config, the OT fit, a fitting key, the training data or its
source) and returns a :class:`Sampler`: ``draw(key) -> codes [num_samples, d]`` (jitted once), facts for the
report, and the decoder of the codes (None: the run's autoencoder; the VAE brings its own).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Union

import jax
import ml_collections
import numpy as np

from lsot_jax import artifacts
from lsot_jax import baselines
from lsot_jax import config as config_lib
from lsot_jax import feeds
from lsot_jax import generate
from lsot_jax import ott_interop
from lsot_jax import solver as solver_lib
from lsot_jax import stage_ot
from lsot_jax import streaming
from lsot_jax import tracking
from lsot_jax import train

__all__ = ["SAMPLERS", "Sampler", "SamplerInputs", "lsot_generate_kwargs"]

# Each draw function is jitted once, here: the fitted parameters and codes are arguments; the method, the
# source, the number of samples and the LSOT settings (Python floats) are static.
_GENERATE = jax.jit(generate.generate, static_argnums=(0, 2, 5),
                    static_argnames=("angle_threshold", "temperature"))
_GAUSSIAN = jax.jit(baselines.sample_gaussian, static_argnums=2)
_GMM = jax.jit(baselines.sample_gmm, static_argnums=2)
_SINKHORN = jax.jit(baselines.sample_sinkhorn_map, static_argnums=2)
_WGAN_GP = jax.jit(baselines.sample_wgan_gp, static_argnums=2)
_RESAMPLE = jax.jit(baselines.sample_resample, static_argnums=2)
_NORMAL = jax.jit(jax.random.normal, static_argnums=1)
_OTT_SOLVE = jax.jit(ott_interop.ott_semidiscrete_solve, static_argnames=("num_iterations", "batch_size"))


@dataclasses.dataclass(frozen=True)
class SamplerInputs:
  """What a sampler builder may use.

  Attributes:
    config: the run's config.
    fit: the OT fit (its problem's y [n, d] are the codes the baselines fit too).
    fit_key: the method's key for fitting (WGAN-GP, Sinkhorn, ott-jax).
    train_data: the training data the VAE trains on: an array [N, ...], or the split as a source
      (``data.stream``; the VAE then reads :func:`lsot_jax.feeds.training_stream` of it: the array's batches).
    vae_dir: the VAE's checkpoint folder.
    vae_log: the VAE's JSON-lines log.
    tracker: where the trained baselines' losses go (``wgan_gp/...``, ``vae/...``); None writes nothing.
  """

  config: ml_collections.ConfigDict
  fit: artifacts.OTFit
  fit_key: jax.Array
  train_data: Union[np.ndarray, streaming.ImageSource]
  vae_dir: str
  vae_log: str
  tracker: Optional[tracking.Tracker] = None


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A method ready to draw.

  Attributes:
    draw: ``draw(key) -> codes [num_samples, d]``.
    info: JSON-serialisable facts (settings used, fit diagnostics).
    decoder: the model decoding the codes, or None for the run's autoencoder.
  """

  draw: Callable[[jax.Array], jax.Array]
  info: Dict[str, Any]
  decoder: Optional[artifacts.Autoencoder] = None


def lsot_generate_kwargs(config: ml_collections.ConfigDict, method: str,
                         potential: solver_lib.BrenierPotential, source: Any) -> Dict[str, float]:
  """The keyword arguments of :func:`lsot_jax.generate.generate` the sample stage uses for an LSOT method.

  Args:
    config: the run's config (``sample.angle_threshold``, ``sample.blend_scale``, ``sample.soft_temperature``,
      ``sample.soft_relative`` and ``seed``).
    method: one of :data:`lsot_jax.config.LSOT_METHODS`.
    potential: the fitted potential (y [n, d], h [n]).
    source: the source measure of the fit (``.sample(key, num) -> [num, d]``).

  Returns:
    ``{}`` for ``exact``, ``{"angle_threshold": radians, "blend_scale": s}`` for ``extended``
    (``sample.angle_threshold`` or :func:`lsot_jax.generate.default_angle_threshold` of the codes, and
    ``sample.blend_scale``) and ``{"temperature": t}`` for ``soft``
    (``sample.soft_temperature``, or ``soft_relative`` times the score gap of 2048 seeded source samples).
  """
  sm = config.sample
  if method == "exact":
    return {}
  if method == "extended":
    return {"angle_threshold": (float(sm.angle_threshold) if sm.angle_threshold is not None
                                else float(generate.default_angle_threshold(potential.y))),
            "blend_scale": float(sm.blend_scale)}
  if method == "soft":
    if sm.soft_temperature is not None:
      return {"temperature": float(sm.soft_temperature)}
    probe = source.sample(config_lib.config_key(config, config_lib.SALT_SAMPLE, 99), 2048)
    return {"temperature": float(sm.soft_relative * solver_lib.score_gap(probe, potential.y, potential.h))}
  raise config_lib.PipelineError(f"Unknown LSOT method {method!r}; valid: {', '.join(config_lib.LSOT_METHODS)}.")


def _lsot(method: str) -> Callable[[SamplerInputs], Sampler]:
  def build(inp: SamplerInputs) -> Sampler:
    potential, source = inp.fit.potential, inp.fit.problem.source
    kwargs = lsot_generate_kwargs(inp.config, method, potential, source)
    num = int(inp.config.sample.num_samples)
    return Sampler(lambda key: _GENERATE(method, key, source, potential.y, potential.h, num, **kwargs),
                   dict(kwargs))
  return build


def _gaussian(inp: SamplerInputs) -> Sampler:
  params = baselines.fit_gaussian(np.asarray(inp.fit.problem.y))
  num = int(inp.config.sample.num_samples)
  return Sampler(lambda key: _GAUSSIAN(params, key, num), {})


def _gmm(inp: SamplerInputs) -> Sampler:
  sm = inp.config.sample
  params = baselines.fit_gmm(np.asarray(inp.fit.problem.y), int(sm.gmm_components), seed=int(inp.config.seed))
  num = int(sm.num_samples)
  return Sampler(lambda key: _GMM(params, key, num), {})


def _sinkhorn(inp: SamplerInputs) -> Sampler:
  sm = inp.config.sample
  params = baselines.fit_sinkhorn_map(inp.fit_key, np.asarray(inp.fit.problem.y),
                                      max_codes=int(sm.sinkhorn_max_codes))
  info = {"epsilon": float(params["epsilon"]), "converged": bool(params["converged"])}
  num = int(sm.num_samples)
  return Sampler(lambda key: _SINKHORN(params, key, num), info)


def _wgan_gp(inp: SamplerInputs) -> Sampler:
  sm = inp.config.sample
  params = baselines.train_wgan_gp(inp.fit_key, np.asarray(inp.fit.problem.y), int(sm.wgan_steps),
                                   batch_size=int(sm.wgan_batch_size),
                                   learning_rate=float(sm.wgan_learning_rate), tracker=inp.tracker)
  num = int(sm.num_samples)
  return Sampler(lambda key: _WGAN_GP(params, key, num), {})


def _ott_semidiscrete(inp: SamplerInputs) -> Sampler:
  ot, problem, potential = inp.config.ot, inp.fit.problem, inp.fit.potential
  h_ott = _OTT_SOLVE(inp.fit_key, problem, num_iterations=int(ot.num_iterations), batch_size=int(ot.batch_size),
                     learning_rate=2.0 * problem.scale * float(ot.learning_rate))[0].h
  errs = stage_ot.marginal_errors(dataclasses.replace(potential, h=h_ott),
                                  config_lib.config_key(inp.config, config_lib.SALT_MARGINAL), problem.source,
                                  problem.weights, num_samples=int(ot.marginal_samples))
  info = {"marginal_l1": float(errs["l1"]), "marginal_noise_floor": float(errs["noise_floor"])}
  source, num = problem.source, int(inp.config.sample.num_samples)
  return Sampler(lambda key: _GENERATE("exact", key, source, potential.y, h_ott, num), info)


def _resample(inp: SamplerInputs) -> Sampler:
  problem = inp.fit.problem
  params = baselines.fit_resample(np.asarray(problem.y), np.asarray(problem.weights))
  num = int(inp.config.sample.num_samples)
  return Sampler(lambda key: _RESAMPLE(params, key, num), {})


def _vae(inp: SamplerInputs) -> Sampler:
  config = inp.config
  kind = config.ae.kind if config.ae.kind != "identity" else "mlp"
  train_cfg = config_lib.ae_train_config(config, config.sample.vae_epochs)
  if isinstance(inp.train_data, streaming.ImageSource):
    data: Any = feeds.training_stream(inp.train_data, train_cfg)
    shape = inp.train_data.example_shape
  else:
    data, shape = inp.train_data, inp.train_data.shape[1:]
  with streaming.closing_streams(data):
    graphdef, params, _ = train.train_vae(
        data, config_lib.ae_model_config(config, shape, kind), inp.vae_dir, train_cfg,
        beta=float(config.sample.vae_beta), log_path=inp.vae_log, progress=False, tracker=inp.tracker)
  num, dim = int(config.sample.num_samples), int(config.ae.latent_dim)
  return Sampler(lambda key: _NORMAL(key, (num, dim)), {}, artifacts.Autoencoder(graphdef, params))


SAMPLERS: Dict[str, Callable[[SamplerInputs], Sampler]] = {
    "exact": _lsot("exact"),
    "extended": _lsot("extended"),
    "soft": _lsot("soft"),
    "gaussian": _gaussian,
    "gmm": _gmm,
    "sinkhorn": _sinkhorn,
    "wgan_gp": _wgan_gp,
    "vae": _vae,
    "ott_semidiscrete": _ott_semidiscrete,
    "resample": _resample,
}
assert tuple(SAMPLERS) == config_lib.METHODS
