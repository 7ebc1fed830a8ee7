"""Comparison generators in latent space (baselines of docs/ARCHITECTURE.md and the README results).

Each baseline is a pair of pure functions: a fit that returns a parameter
pytree of arrays, and ``sample(params, key, num) -> Array [num, d]``:

- :func:`fit_gaussian` / :func:`sample_gaussian`: one Gaussian (mean and full
  covariance) fitted to the codes;
- :func:`fit_gmm` / :func:`sample_gmm`: a 10-component full-covariance
  Gaussian mixture (scikit-learn EM, fixed seed; the RAE paper's ex-post
  density) with a JAX sampler;
- :func:`fit_sinkhorn_map` / :func:`sample_sinkhorn_map`: the ott-jax entropic
  (Sinkhorn) map from a standard Gaussian to the codes;
- :func:`train_wgan_gp` / :func:`sample_wgan_gp`: a latent WGAN-GP
  (Gulrajani et al. 2017), the min-max the paper avoids;
- :func:`fit_resample` / :func:`sample_resample`: the training codes
  themselves, drawn with their weights. A reference, not a generator: it is
  what LSOT ``exact`` draws when the OT problem is solved exactly, so its
  scores are the evaluation protocol's own noise level (and, decoded, the
  autoencoder's ceiling).

The samplers are jittable with ``num`` static. The fits run once, on the host
(:func:`train_wgan_gp` jits its own ``lax.scan`` of training steps).
"""
import functools
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ott.geometry import pointcloud
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn
from sklearn import mixture

from lsot_jax import tracking

__all__ = [
    "fit_gaussian",
    "fit_gmm",
    "fit_resample",
    "fit_sinkhorn_map",
    "mlp_apply",
    "mlp_init",
    "sample_gaussian",
    "sample_gmm",
    "sample_resample",
    "sample_sinkhorn_map",
    "sample_wgan_gp",
    "train_wgan_gp",
]

Params = Dict[str, Any]


def _check_codes(codes: Any, min_points: int = 2) -> np.ndarray:
  """Returns codes as a float64 NumPy array, or raises a ValueError."""
  shape = np.shape(codes)
  if len(shape) != 2:
    raise ValueError(f"codes must have shape [num_codes, dim], got {shape}.")
  if shape[0] < min_points:
    raise ValueError(f"codes has {shape[0]} points; at least {min_points} are "
                     "needed.")
  codes = np.asarray(codes, dtype=np.float64)
  if not np.all(np.isfinite(codes)):
    raise ValueError("codes contain NaN or inf.")
  return codes


def _check_num(num: int) -> None:
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}.")


# ----------------------------------------------------------------------------
# Single Gaussian


def fit_gaussian(codes: Any, *, jitter: float = 1e-6) -> Params:
  """Fits one Gaussian (mean and full covariance) to the codes.

  Args:
    codes: Array of shape [n, d], n >= 2.
    jitter: added to the covariance diagonal, relative to its mean diagonal,
      before the Cholesky factorisation (keeps degenerate codes sampleable).

  Returns:
    ``{"mean": [d], "cov": [d, d], "chol": [d, d]}`` (float32), where ``cov``
    is the unbiased sample covariance and ``chol`` the lower Cholesky factor
    of the jittered covariance.
  """
  codes = _check_codes(codes)
  mean = codes.mean(axis=0)
  cov = np.atleast_2d(np.cov(codes, rowvar=False))
  scale = max(float(np.mean(np.diag(cov))), 1e-12)
  chol = np.linalg.cholesky(cov + jitter * scale * np.eye(cov.shape[0]))
  return dict(mean=jnp.asarray(mean, jnp.float32),
              cov=jnp.asarray(cov, jnp.float32),
              chol=jnp.asarray(chol, jnp.float32))


def sample_gaussian(params: Params, key: jax.Array, num: int) -> jax.Array:
  """Draws from the fitted Gaussian.

  Args:
    params: output of :func:`fit_gaussian`.
    key: a JAX PRNG key.
    num: number of samples (static under jit).

  Returns:
    Array of shape [num, d].
  """
  _check_num(num)
  mean, chol = params["mean"], params["chol"]
  z = jax.random.normal(key, (num, mean.shape[0]))
  return mean[None, :] + z @ chol.T


# ----------------------------------------------------------------------------
# Gaussian mixture


def fit_gmm(
    codes: Any,
    num_components: int = 10,
    *,
    seed: int = 0,
    reg_covar: float = 1e-6,
    max_iter: int = 200,
    n_init: int = 1,
) -> Params:
  """Fits a full-covariance Gaussian mixture to the codes (scikit-learn EM).

  Args:
    codes: Array of shape [n, d], n >= num_components.
    num_components: number of components (10 as in the RAE paper).
    seed: ``random_state`` of :class:`sklearn.mixture.GaussianMixture`
      (k-means initialisation), fixed for reproducibility.
    reg_covar: added to the covariance diagonals by scikit-learn.
    max_iter: EM iterations.
    n_init: EM restarts (best likelihood kept).

  Returns:
    ``{"weights": [K], "means": [K, d], "chols": [K, d, d]}`` (float32), the
    mixture weights, means and lower Cholesky factors of the covariances.
  """
  if num_components < 1:
    raise ValueError(f"num_components must be >= 1, got {num_components}.")
  codes = _check_codes(codes, min_points=max(2, num_components))
  gmm = mixture.GaussianMixture(
      n_components=num_components, covariance_type="full",
      reg_covar=reg_covar, max_iter=max_iter, n_init=n_init,
      random_state=seed)
  gmm.fit(codes)
  chols = np.linalg.cholesky(gmm.covariances_)
  return dict(weights=jnp.asarray(gmm.weights_, jnp.float32),
              means=jnp.asarray(gmm.means_, jnp.float32),
              chols=jnp.asarray(chols, jnp.float32))


def sample_gmm(params: Params, key: jax.Array, num: int) -> jax.Array:
  """Draws from the fitted mixture: a component, then its Gaussian.

  Args:
    params: output of :func:`fit_gmm`.
    key: a JAX PRNG key.
    num: number of samples (static under jit).

  Returns:
    Array of shape [num, d].
  """
  _check_num(num)
  weights, means, chols = params["weights"], params["means"], params["chols"]
  key_comp, key_z = jax.random.split(key)
  comp = jax.random.categorical(key_comp, jnp.log(weights), shape=(num,))
  z = jax.random.normal(key_z, (num, means.shape[1]))
  return means[comp] + jnp.einsum("nij,nj->ni", chols[comp], z)


# ----------------------------------------------------------------------------
# Resampled training codes (the reference)


def fit_resample(codes: Any, weights: Optional[Any] = None) -> Params:
  """The codes and the log of their weights, for :func:`sample_resample`.

  Args:
    codes: array [n, d], the training codes.
    weights: array [n] of non-negative weights (normalised here); None: uniform.

  Returns:
    ``{"codes": float32 [n, d], "log_weights": float32 [n]}``.

  Raises:
    ValueError: codes that are not a finite [n, d] array, or weights of another length, negative,
      non-finite or all zero.
  """
  codes = _check_codes(codes, min_points=1)
  n = codes.shape[0]
  w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum, got shape "
                     f"{w.shape}.")
  with np.errstate(divide="ignore"):
    log_w = np.log(w / w.sum())
  return dict(codes=jnp.asarray(codes, jnp.float32), log_weights=jnp.asarray(log_w, jnp.float32))


def sample_resample(params: Params, key: jax.Array, num: int) -> jax.Array:
  """Draws training codes with replacement, code i with probability nu_i.

  Args:
    params: output of :func:`fit_resample`.
    key: a JAX PRNG key.
    num: number of samples (static under jit).

  Returns:
    Array of shape [num, d], rows of the codes.
  """
  _check_num(num)
  index = jax.random.categorical(key, params["log_weights"], shape=(num,))
  return params["codes"][index]


# ----------------------------------------------------------------------------
# ott-jax entropic (Sinkhorn) map


def fit_sinkhorn_map(
    key: jax.Array,
    codes: Any,
    *,
    num_source: Optional[int] = None,
    max_codes: int = 4096,
    epsilon: Optional[float] = None,
    relative_epsilon: float = 0.05,
    max_iterations: int = 2000,
    threshold: float = 1e-3,
) -> Params:
  r"""Solves entropic OT from a standard Gaussian to the codes (ott-jax).

  Source points ``x ~ N(0, I_d)`` are matched to the codes by
  ``ott.solvers.linear.sinkhorn.Sinkhorn`` on
  ``PointCloud(x, codes, epsilon=epsilon)`` (squared-Euclidean cost
  ``|x - y|^2``, uniform weights, dense cost matrix: no ``batch_size``,
  ott-jax issue 700). The map is the entropic (barycentric) map of the
  solution's dual potentials, ``to_dual_potentials().transport``, i.e.
  ``T(z) = sum_j softmax_j((g_j - |z - y_j|^2) / epsilon) y_j`` for fresh
  ``z``: a smooth map, so it puts mass between clusters (the failure mode the
  paper's discontinuous Brenier map avoids).

  Epsilon: by default ``relative_epsilon`` (0.05) times the standard
  deviation of the cost matrix between the source samples and the *centred*
  codes. That is ott-jax's own default scale (``0.05 * std`` of the cost),
  made independent of where the codes sit: uncentred, a mean offset ``s``
  would inflate the cost spread through the cross term ``2 <s, x - y>`` and
  blur the map for no reason. Smaller values make ``T`` closer to the
  semi-discrete map (outputs near existing codes, slower Sinkhorn); larger
  ones contract outputs toward the codes' mean (for Gaussians the map's slope
  is roughly ``1 - epsilon / (4 var)`` per direction). The value used is
  stored in the parameters.

  Args:
    key: a JAX PRNG key (code subsampling and source draws).
    codes: Array of shape [n, d].
    num_source: number of source samples; default: the number of codes used
      (balanced problem).
    max_codes: codes beyond this many are subsampled without replacement
      (the cost matrix is dense, ``num_source * max_codes`` floats).
    epsilon: absolute entropic regularisation; overrides
      ``relative_epsilon``.
    relative_epsilon: fraction of the cost matrix's standard deviation.
    max_iterations: Sinkhorn iteration cap.
    threshold: Sinkhorn marginal-error threshold.

  Returns:
    ``{"source": [m, d], "codes": [n', d], "f": [m], "g": [n'],
    "epsilon": scalar, "converged": bool scalar}``.
  """
  codes = _check_codes(codes)
  key_sub, key_src = jax.random.split(key)
  codes = jnp.asarray(codes, jnp.float32)
  if codes.shape[0] > max_codes:
    idx = jax.random.choice(key_sub, codes.shape[0], (max_codes,),
                            replace=False)
    codes = codes[idx]
  num_source = codes.shape[0] if num_source is None else num_source
  if num_source < 2:
    raise ValueError(f"num_source must be >= 2, got {num_source}.")
  source = jax.random.normal(key_src, (num_source, codes.shape[1]))
  if epsilon is None:
    centred = codes - jnp.mean(codes, axis=0, keepdims=True)
    cost_std = pointcloud.PointCloud(source, centred).std_cost_matrix
    eps = relative_epsilon * cost_std
  else:
    if not epsilon > 0:
      raise ValueError(f"epsilon must be positive, got {epsilon}.")
    eps = epsilon
  eps = jnp.asarray(eps, jnp.float32)
  geom = pointcloud.PointCloud(source, codes, epsilon=eps)
  solver = sinkhorn.Sinkhorn(max_iterations=max_iterations,
                             threshold=threshold)
  with jax.numpy_rank_promotion("allow"):
    out = jax.jit(solver)(linear_problem.LinearProblem(geom))
  return dict(source=source, codes=codes, f=out.f, g=out.g, epsilon=eps,
              converged=jnp.asarray(out.converged))


def _sinkhorn_output(params: Params) -> sinkhorn.SinkhornOutput:
  """Rebuilds the ott-jax Sinkhorn output from stored potentials."""
  geom = pointcloud.PointCloud(params["source"], params["codes"],
                               epsilon=params["epsilon"])
  return sinkhorn.SinkhornOutput(
      potentials=(params["f"], params["g"]),
      ot_prob=linear_problem.LinearProblem(geom))


def sample_sinkhorn_map(params: Params, key: jax.Array, num: int) -> jax.Array:
  """Pushes fresh standard-Gaussian draws through the entropic map.

  Args:
    params: output of :func:`fit_sinkhorn_map`.
    key: a JAX PRNG key.
    num: number of samples (static under jit).

  Returns:
    Array of shape [num, d].
  """
  _check_num(num)
  z = jax.random.normal(key, (num, params["codes"].shape[1]))
  with jax.numpy_rank_promotion("allow"):
    return _sinkhorn_output(params).to_dual_potentials().transport(z)


# ----------------------------------------------------------------------------
# Latent WGAN-GP


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> List[Params]:
  """Initialises an MLP as a list of ``{"w": [in, out], "b": [out]}`` layers.

  He-normal weights for hidden (ReLU) layers, LeCun-normal for the output
  layer, zero biases.

  Args:
    key: a JAX PRNG key.
    sizes: layer widths, input first, output last (at least two entries).

  Returns:
    The list of layer parameter dicts.
  """
  if len(sizes) < 2:
    raise ValueError(f"sizes needs input and output widths, got {sizes}.")
  keys = jax.random.split(key, len(sizes) - 1)
  layers = []
  for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    gain = 1.0 if i == len(sizes) - 2 else 2.0
    w = jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(gain / n_in)
    layers.append(dict(w=w, b=jnp.zeros((n_out,))))
  return layers


def mlp_apply(layers: Sequence[Params], x: jax.Array) -> jax.Array:
  """Applies an MLP with ReLU hidden activations and a linear output.

  Args:
    layers: output of :func:`mlp_init`.
    x: Array of shape [b, in].

  Returns:
    Array of shape [b, out].
  """
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
  return x @ layers[-1]["w"] + layers[-1]["b"][None, :]


def _gradient_penalty(critic, real, fake, key):
  """Gulrajani et al. penalty E[(|grad D(x_hat)| - 1)^2] on random mixes."""
  t = jax.random.uniform(key, (real.shape[0], 1))
  x_hat = t * real + (1.0 - t) * fake
  # Rows are independent, so the gradient of the sum is the per-row gradient.
  grads = jax.grad(lambda x: jnp.sum(critic(x)))(x_hat)
  norms = jnp.sqrt(jnp.sum(grads**2, axis=1) + 1e-12)
  return jnp.mean((norms - 1.0)**2)


@functools.partial(
    jax.jit,
    static_argnames=("num_steps", "batch_size", "hidden_sizes", "noise_dim",
                     "n_critic", "gp_weight", "learning_rate", "b1", "b2"))
def _train_wgan_gp(key, codes, *, num_steps, batch_size, hidden_sizes,
                   noise_dim, n_critic, gp_weight, learning_rate, b1, b2):
  """Jitted WGAN-GP training; returns generator and critic params, losses."""
  dim = codes.shape[1]
  key_g, key_c, key_run = jax.random.split(key, 3)
  gen = mlp_init(key_g, (noise_dim, *hidden_sizes, dim))
  crit = mlp_init(key_c, (dim, *hidden_sizes, 1))
  opt = optax.adam(learning_rate, b1=b1, b2=b2)
  gen_opt, crit_opt = opt.init(gen), opt.init(crit)

  def critic_loss(crit, gen, key):
    k_idx, k_z, k_gp = jax.random.split(key, 3)
    real = codes[jax.random.randint(k_idx, (batch_size,), 0, codes.shape[0])]
    z = jax.random.normal(k_z, (batch_size, noise_dim))
    fake = jax.lax.stop_gradient(mlp_apply(gen, z))
    critic = functools.partial(mlp_apply, crit)
    scores = critic(jnp.concatenate([real, fake], axis=0))[:, 0]
    wdist = jnp.mean(scores[:batch_size]) - jnp.mean(scores[batch_size:])
    return -wdist + gp_weight * _gradient_penalty(critic, real, fake, k_gp)

  def gen_loss(gen, crit, key):
    z = jax.random.normal(key, (batch_size, noise_dim))
    return -jnp.mean(mlp_apply(crit, mlp_apply(gen, z)))

  def critic_step(carry, key):
    crit, crit_opt, gen = carry
    loss, grads = jax.value_and_grad(critic_loss)(crit, gen, key)
    updates, crit_opt = opt.update(grads, crit_opt, crit)
    return (optax.apply_updates(crit, updates), crit_opt, gen), loss

  def step(carry, it):
    gen, gen_opt, crit, crit_opt = carry
    step_key = jax.random.fold_in(key_run, it)
    key_crit, key_gen = jax.random.split(step_key)
    (crit, crit_opt, _), c_losses = jax.lax.scan(
        critic_step, (crit, crit_opt, gen),
        jax.random.split(key_crit, n_critic))
    g_loss, grads = jax.value_and_grad(gen_loss)(gen, crit, key_gen)
    updates, gen_opt = opt.update(grads, gen_opt, gen)
    gen = optax.apply_updates(gen, updates)
    return (gen, gen_opt, crit, crit_opt), (c_losses[-1], g_loss)

  (gen, _, crit, _), (c_hist, g_hist) = jax.lax.scan(
      step, (gen, gen_opt, crit, crit_opt), jnp.arange(num_steps))
  return gen, crit, c_hist, g_hist


def train_wgan_gp(
    key: jax.Array,
    codes: Any,
    num_steps: int,
    *,
    batch_size: int = 256,
    hidden_sizes: Sequence[int] = (64, 64, 64),
    noise_dim: Optional[int] = None,
    n_critic: int = 5,
    gp_weight: float = 10.0,
    learning_rate: float = 1e-4,
    b1: float = 0.5,
    b2: float = 0.9,
    return_history: bool = False,
    tracker: Optional[tracking.Tracker] = None,
):
  """Trains a latent WGAN-GP (Gulrajani et al. 2017) on the codes.

  Generator and critic are ReLU MLPs with ``hidden_sizes``; the generator maps
  ``z ~ N(0, I_noise_dim)`` to code space. Each of the ``num_steps``
  generator steps follows ``n_critic`` critic steps on
  ``E[D(fake)] - E[D(real)] + gp_weight * E[(|grad D(x_hat)| - 1)^2]``
  (``x_hat`` uniform on real-fake segments); both use
  ``Adam(learning_rate, b1, b2)`` and batches drawn with replacement. The whole
  run is one jitted ``lax.scan`` (one key per step via ``fold_in``).

  Args:
    key: a JAX PRNG key.
    codes: Array of shape [n, d].
    num_steps: generator steps.
    batch_size: real and fake batch size.
    hidden_sizes: hidden widths of both MLPs.
    noise_dim: generator input dimension; default d.
    n_critic: critic steps per generator step.
    gp_weight: gradient-penalty weight (lambda).
    learning_rate: Adam learning rate.
    b1: Adam beta 1.
    b2: Adam beta 2.
    return_history: also return ``{"critic_loss": [num_steps],
      "generator_loss": [num_steps]}``.
    tracker: a :class:`lsot_jax.tracking.Tracker`; after the scan, generator
      step k (1-based) gets the scalars ``wgan_gp/critic_loss`` (the last
      critic loss before it) and ``wgan_gp/generator_loss``. None writes
      nothing; the result does not depend on it.

  Returns:
    The generator params ``{"layers": [...]}`` for :func:`sample_wgan_gp`,
    and the loss history if ``return_history``.
  """
  codes = _check_codes(codes)
  if num_steps < 1 or n_critic < 1 or batch_size < 1:
    raise ValueError("num_steps, n_critic and batch_size must be >= 1, got "
                     f"{num_steps}, {n_critic}, {batch_size}.")
  noise_dim = codes.shape[1] if noise_dim is None else int(noise_dim)
  gen, _, c_hist, g_hist = _train_wgan_gp(
      key, jnp.asarray(codes, jnp.float32), num_steps=int(num_steps),
      batch_size=int(batch_size), hidden_sizes=tuple(int(h) for h in
                                                     hidden_sizes),
      noise_dim=noise_dim, n_critic=int(n_critic), gp_weight=float(gp_weight),
      learning_rate=float(learning_rate), b1=float(b1), b2=float(b2))
  params = dict(layers=gen)
  if tracker is not None:
    losses = jax.device_get(dict(critic_loss=c_hist, generator_loss=g_hist))
    tracking.write_history(tracker, losses, "wgan_gp")
  if return_history:
    return params, dict(critic_loss=c_hist, generator_loss=g_hist)
  return params


def sample_wgan_gp(params: Params, key: jax.Array, num: int) -> jax.Array:
  """Draws from the trained WGAN-GP generator.

  Args:
    params: output of :func:`train_wgan_gp`.
    key: a JAX PRNG key.
    num: number of samples (static under jit).

  Returns:
    Array of shape [num, d].
  """
  _check_num(num)
  layers = params["layers"]
  z = jax.random.normal(key, (num, layers[0]["w"].shape[0]))
  return mlp_apply(layers, z)
