"""Flax NNX models used as pure functions: autoencoders, a Gaussian-prior VAE and an evaluation classifier.

Every model is built once from a key and split into a static graph definition and a parameter pytree::

    graphdef, params = init_autoencoder(jax.random.key(0), cfg)
    z = encode(graphdef, params, x)            # Array of shape [B, latent_dim]
    x_hat = decode(graphdef, params, z)        # Array of shape [B, *input_shape]

``params`` is a plain nested dict of arrays (string keys only), so it works with optax, Orbax and
``jax.vmap`` directly; ``graphdef`` is hashable and holds no arrays, so it can be a static argument or a
closure constant (``jax.jit(encode, static_argnums=0)``). The functions here do not jit; the caller does.
Inits take a ``jax.random.key`` (never an int), so ``jax.vmap(lambda k: init_autoencoder(k, cfg)[1])`` builds
a batch of models for hyperparameter scans.

Architectures (kept modest so MNIST trains on a CPU in minutes):

* ``"mlp"``: flatten -> Dense(widths[0]) -> ... -> Dense(latent); the decoder mirrors it. For toy points
  (input shape ``(2,)``) and small images (sklearn digits, ``(8, 8, 1)``).
* ``"conv28"``: two 4x4 stride-2 convolutions (28 -> 14 -> 7) and a dense layer to the latent code; the
  decoder is a dense layer and two stride-2 transposed convolutions (7 -> 14 -> 28). For MNIST / Fashion.
  The transposed convolutions are computed by :func:`conv_transpose_stride2` (one matmul and overlapping
  adds), equal to ``nnx.ConvTranspose``'s output on the same kernel but ~3.5x faster to differentiate on
  the CPU, where XLA's kernel gradient of an input-dilated convolution is the slow part of a training step.
* ``"conv64"``: the same with four stride-2 stages (64 -> 32 -> 16 -> 8 -> 4). For 64x64x3 CelebA.

Image decoders end in a sigmoid (outputs in [0, 1]); point decoders are linear.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Literal, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "AutoencoderConfig",
    "ClassifierConfig",
    "Params",
    "autoencoder_loss",
    "classifier_apply",
    "classifier_features",
    "classifier_logits",
    "conv_transpose_stride2",
    "classifier_loss",
    "decode",
    "decode_logits",
    "encode",
    "init_autoencoder",
    "init_classifier",
    "init_vae",
    "vae_encode",
    "vae_loss",
    "vae_sample",
]

Params = Dict[str, Any]
AutoencoderKind = Literal["mlp", "conv28", "conv64"]
ClassifierKind = Literal["mlp", "cnn"]

_DEFAULT_AE_WIDTHS = {"mlp": (256, 128), "conv28": (32, 64), "conv64": (32, 64, 128, 256)}
_DEFAULT_AE_SHAPES = {"conv28": (28, 28, 1), "conv64": (64, 64, 3)}
_CONV_STAGES = {"conv28": 2, "conv64": 4}
_DEFAULT_CLASSIFIER_WIDTHS = {"mlp": (256, 256), "cnn": (32, 64)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
  """Architecture of an autoencoder or VAE.

  Attributes:
    kind: ``"mlp"``, ``"conv28"`` (28x28xC images) or ``"conv64"`` (64x64xC images).
    latent_dim: dimension d of the latent code.
    input_shape: shape of one example, e.g. ``(2,)`` for points, ``(8, 8, 1)``, ``(28, 28, 1)``. Empty means
      the kind's default (``(28, 28, 1)`` for conv28, ``(64, 64, 3)`` for conv64; mlp has none).
    widths: hidden widths (mlp) or channels per stride-2 stage (conv: 2 for conv28, 4 for conv64), from the
      input side. Empty means the kind's default.
    output_activation: ``"sigmoid"`` (images in [0, 1]), ``"linear"`` (points) or ``"auto"``: sigmoid when
      ``input_shape`` has rank 3 (an image), linear otherwise.
  """

  kind: AutoencoderKind = "mlp"
  latent_dim: int = 8
  input_shape: Tuple[int, ...] = ()
  widths: Tuple[int, ...] = ()
  output_activation: Literal["auto", "sigmoid", "linear"] = "auto"

  def __post_init__(self):
    if self.kind not in _DEFAULT_AE_WIDTHS:
      raise ValueError(f"Unknown autoencoder kind {self.kind!r}; expected one of {sorted(_DEFAULT_AE_WIDTHS)}.")
    shape = tuple(int(s) for s in self.input_shape) or _DEFAULT_AE_SHAPES.get(self.kind, ())
    widths = tuple(int(w) for w in self.widths) or _DEFAULT_AE_WIDTHS[self.kind]
    object.__setattr__(self, "input_shape", shape)
    object.__setattr__(self, "widths", widths)
    if not shape or any(s <= 0 for s in shape):
      raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {self.input_shape!r}.")
    if self.latent_dim <= 0:
      raise ValueError(f"latent_dim must be positive, got {self.latent_dim}.")
    if any(w <= 0 for w in widths):
      raise ValueError(f"widths must be positive, got {widths}.")
    if self.output_activation not in ("auto", "sigmoid", "linear"):
      raise ValueError(f"Unknown output_activation {self.output_activation!r}.")
    if self.kind in _CONV_STAGES:
      stages = _CONV_STAGES[self.kind]
      if len(shape) != 3:
        raise ValueError(f"{self.kind} needs an image input_shape (H, W, C), got {shape}.")
      if len(widths) != stages:
        raise ValueError(f"{self.kind} needs {stages} widths (one per stride-2 stage), got {widths}.")
      if shape[0] % 2**stages or shape[1] % 2**stages:
        raise ValueError(f"{self.kind} needs H and W divisible by {2**stages}, got {shape}.")

  @property
  def is_image(self) -> bool:
    """Whether the decoder ends in a sigmoid."""
    if self.output_activation == "auto":
      return len(self.input_shape) == 3
    return self.output_activation == "sigmoid"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
  """Architecture of the evaluation classifier (its penultimate layer is the metric feature space).

  Attributes:
    kind: ``"cnn"`` (images, stride-2 3x3 convolutions, one per width) or ``"mlp"``.
    input_shape: shape of one example, e.g. ``(28, 28, 1)`` or ``(8, 8, 1)``.
    num_classes: number of labels.
    widths: channels per conv stage (cnn) or hidden widths (mlp). Empty means the kind's default.
    feature_dim: width F of the penultimate (feature) layer.
  """

  kind: ClassifierKind = "cnn"
  input_shape: Tuple[int, ...] = (28, 28, 1)
  num_classes: int = 10
  widths: Tuple[int, ...] = ()
  feature_dim: int = 128

  def __post_init__(self):
    if self.kind not in _DEFAULT_CLASSIFIER_WIDTHS:
      raise ValueError(f"Unknown classifier kind {self.kind!r}; expected 'cnn' or 'mlp'.")
    shape = tuple(int(s) for s in self.input_shape)
    widths = tuple(int(w) for w in self.widths) or _DEFAULT_CLASSIFIER_WIDTHS[self.kind]
    object.__setattr__(self, "input_shape", shape)
    object.__setattr__(self, "widths", widths)
    if not shape or any(s <= 0 for s in shape):
      raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {self.input_shape!r}.")
    if self.kind == "cnn" and len(shape) != 3:
      raise ValueError(f"A cnn classifier needs an image input_shape (H, W, C), got {shape}.")
    if self.num_classes < 2 or self.feature_dim <= 0 or any(w <= 0 for w in widths):
      raise ValueError("num_classes must be >= 2 and feature_dim / widths positive; "
                       f"got {self.num_classes}, {self.feature_dim}, {widths}.")


def _check_batch(x: jax.Array, shape: Tuple[int, ...], what: str) -> None:
  if tuple(x.shape[1:]) != tuple(shape):
    raise ValueError(f"{what} expects inputs of shape [B, {', '.join(map(str, shape))}], got {tuple(x.shape)}.")


def _overlap_add(q: jax.Array, axis: int) -> jax.Array:
  """Folds 4-tap stride-2 contributions along one axis into the SAME-padded output.

  Args:
    q: [..., L, 2, 2, ...] with the input position at ``axis``, then the tap's block offset t and phase p
      (tap r = 2 t + p of the flipped kernel, which lands on full-output position 2 (i + t) + p).

  Returns:
    [..., 2 L, ...]: the full output of length 2 L + 2 with its first and last positions cut off, which is
    what ``padding="SAME"`` keeps.
  """
  pad_after = [(0, 0)] * (q.ndim - 1)
  pad_before = list(pad_after)
  pad_after[axis] = (0, 1)
  pad_before[axis] = (1, 0)
  full = jnp.pad(jnp.take(q, 0, axis=axis + 1), pad_after) + jnp.pad(jnp.take(q, 1, axis=axis + 1), pad_before)
  shape = full.shape
  full = full.reshape(shape[:axis] + (2 * shape[axis],) + shape[axis + 2:])
  return jax.lax.slice_in_dim(full, 1, 2 * shape[axis] - 1, axis=axis)


def conv_transpose_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 4x4, stride-2, ``padding="SAME"`` transposed convolution as one matmul and overlapping adds.

  The same function as ``nnx.ConvTranspose(c, o, (4, 4), strides=2, padding="SAME")`` without its bias
  (``lax.conv_transpose``, kernel not flipped): every input pixel's ``x @ kernel`` patch of 4x4 outputs is
  added at stride 2. XLA computes the transposed convolution as a convolution of the zero-dilated input,
  whose kernel gradient on the CPU is several times slower than the matmul's; this form also skips the
  multiplications by the inserted zeros.

  Args:
    x: [B, H, W, C] inputs.
    kernel: [4, 4, C, O], in ``nnx.ConvTranspose``'s layout.

  Returns:
    [B, 2 H, 2 W, O].
  """
  b, h, w, _ = x.shape
  o = kernel.shape[-1]
  patches = jnp.einsum("bhwc,uvco->bhwuvo", x, kernel[::-1, ::-1]).reshape(b, h, w, 2, 2, 2, 2, o)
  patches = patches.transpose(0, 1, 3, 4, 2, 5, 6, 7)  # [B, H, t_h, p_h, W, t_w, p_w, O]
  return _overlap_add(_overlap_add(patches, 1), 2)


def _stage_name(prefix: str, i: int) -> str:
  return f"{prefix}{i}"


class _Encoder(nnx.Module):
  """Maps [B, *input_shape] to [B, out_dim]."""

  def __init__(self, cfg: AutoencoderConfig, out_dim: int, *, rngs: nnx.Rngs):
    self.kind = cfg.kind
    if cfg.kind == "mlp":
      sizes = (math.prod(cfg.input_shape),) + cfg.widths
      self.num_layers = len(cfg.widths)
      for i in range(self.num_layers):
        setattr(self, _stage_name("dense", i), nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
      self.out = nnx.Linear(sizes[-1], out_dim, rngs=rngs)
    else:
      channels = (cfg.input_shape[-1],) + cfg.widths
      self.num_layers = len(cfg.widths)
      for i in range(self.num_layers):
        conv = nnx.Conv(channels[i], channels[i + 1], (4, 4), strides=2, padding="SAME", rngs=rngs)
        setattr(self, _stage_name("conv", i), conv)
      factor = 2**self.num_layers
      flat = (cfg.input_shape[0] // factor) * (cfg.input_shape[1] // factor) * cfg.widths[-1]
      self.out = nnx.Linear(flat, out_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "mlp":
      h = x.reshape(x.shape[0], -1)
      for i in range(self.num_layers):
        h = jax.nn.gelu(getattr(self, _stage_name("dense", i))(h))
    else:
      h = x
      for i in range(self.num_layers):
        h = jax.nn.relu(getattr(self, _stage_name("conv", i))(h))
      h = h.reshape(h.shape[0], -1)
    return self.out(h)


class _Decoder(nnx.Module):
  """Maps [B, latent_dim] to pre-activation outputs [B, *input_shape]."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.kind
    self.input_shape = cfg.input_shape
    widths = cfg.widths[::-1]
    self.num_layers = len(widths)
    if cfg.kind == "mlp":
      sizes = (cfg.latent_dim,) + widths
      for i in range(self.num_layers):
        setattr(self, _stage_name("dense", i), nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
      self.out = nnx.Linear(sizes[-1], math.prod(cfg.input_shape), rngs=rngs)
    else:
      factor = 2**self.num_layers
      self.base_shape = (cfg.input_shape[0] // factor, cfg.input_shape[1] // factor, widths[0])
      self.inp = nnx.Linear(cfg.latent_dim, math.prod(self.base_shape), rngs=rngs)
      channels = widths + (cfg.input_shape[-1],)
      for i in range(self.num_layers):
        deconv = nnx.ConvTranspose(channels[i], channels[i + 1], (4, 4), strides=2, padding="SAME", rngs=rngs)
        setattr(self, _stage_name("deconv", i), deconv)

  def __call__(self, z: jax.Array) -> jax.Array:
    if self.kind == "mlp":
      h = z
      for i in range(self.num_layers):
        h = jax.nn.gelu(getattr(self, _stage_name("dense", i))(h))
      return self.out(h).reshape((z.shape[0],) + self.input_shape)
    h = jax.nn.relu(self.inp(z)).reshape((z.shape[0],) + self.base_shape)
    for i in range(self.num_layers):
      deconv = getattr(self, _stage_name("deconv", i))
      h = conv_transpose_stride2(h, deconv.kernel[...]) + deconv.bias[...].reshape(1, 1, 1, -1)
      if i < self.num_layers - 1:
        h = jax.nn.relu(h)
    return h


class _Autoencoder(nnx.Module):
  """Deterministic autoencoder."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = _Encoder(cfg, cfg.latent_dim, rngs=rngs)
    self.decoder = _Decoder(cfg, rngs=rngs)

  def encode(self, x: jax.Array) -> jax.Array:
    return self.encoder(x)


class _VAE(nnx.Module):
  """Gaussian-prior VAE; the encoder outputs [mean, log-variance]."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = _Encoder(cfg, 2 * cfg.latent_dim, rngs=rngs)
    self.decoder = _Decoder(cfg, rngs=rngs)

  def moments(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    out = self.encoder(x)
    return out[:, :self.cfg.latent_dim], out[:, self.cfg.latent_dim:]

  def encode(self, x: jax.Array) -> jax.Array:
    return self.moments(x)[0]


class _Classifier(nnx.Module):
  """Small classifier whose penultimate activations are the evaluation features."""

  def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.kind
    self.num_layers = len(cfg.widths)
    if cfg.kind == "cnn":
      channels = (cfg.input_shape[-1],) + cfg.widths
      h, w = cfg.input_shape[0], cfg.input_shape[1]
      for i in range(self.num_layers):
        conv = nnx.Conv(channels[i], channels[i + 1], (3, 3), strides=2, padding="SAME", rngs=rngs)
        setattr(self, _stage_name("conv", i), conv)
        h, w = -(-h // 2), -(-w // 2)
      flat = h * w * cfg.widths[-1]
    else:
      sizes = (math.prod(cfg.input_shape),) + cfg.widths
      for i in range(self.num_layers):
        setattr(self, _stage_name("dense", i), nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
      flat = sizes[-1]
    self.feature = nnx.Linear(flat, cfg.feature_dim, rngs=rngs)
    self.head = nnx.Linear(cfg.feature_dim, cfg.num_classes, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    if self.kind == "cnn":
      h = x
      for i in range(self.num_layers):
        h = jax.nn.relu(getattr(self, _stage_name("conv", i))(h))
      h = h.reshape(h.shape[0], -1)
    else:
      h = x.reshape(x.shape[0], -1)
      for i in range(self.num_layers):
        h = jax.nn.relu(getattr(self, _stage_name("dense", i))(h))
    return jax.nn.relu(self.feature(h))

  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    feats = self.features(x)
    return self.head(feats), feats


# Standard deviation of a unit normal truncated to [-2, 2] (as in flax's lecun_normal).
_TRUNCATED_STD = 0.87962566103423978


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_params(key: jax.Array, treedef: Any, specs: Tuple[Tuple[str, Tuple[int, ...], Any], ...]) -> Params:
  """Draws every kernel from one truncated-normal sample (LeCun scaling, fan-in = prod(shape[:-1]))."""
  sizes = [math.prod(shape) for name, shape, _ in specs if name == "kernel"]
  noise = jax.random.truncated_normal(key, -2.0, 2.0, (max(sum(sizes), 1),), jnp.float32)
  leaves, offset = [], 0
  for name, shape, dtype in specs:
    if name == "kernel":
      size = math.prod(shape)
      scale = 1.0 / (_TRUNCATED_STD * math.sqrt(math.prod(shape[:-1])))
      leaves.append((noise[offset:offset + size].reshape(shape) * scale).astype(dtype))
      offset += size
    elif name == "bias":
      leaves.append(jnp.zeros(shape, dtype))
    else:
      raise ValueError(f"No initialiser for parameter {name!r}.")
  return jax.tree.unflatten(treedef, leaves)


def _build(module_cls: Any, cfg: Any, key: jax.Array) -> Tuple[nnx.GraphDef, Params]:
  """Builds a module abstractly (no compute) and draws its parameters from ``key`` in one jitted call.

  Initialising each layer with its own sampler would compile one random kernel per parameter shape, which
  takes seconds per model on a CPU; one draw for all kernels compiles once per architecture. The
  distribution is flax's default (LeCun-normal kernels truncated at 2 std, zero biases).
  """
  if not (hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
    raise ValueError("Model inits take a typed key from jax.random.key(seed), not an int or a raw uint32 key.")
  abstract = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
  specs = tuple((path[-1].key, tuple(leaf.shape), jnp.dtype(leaf.dtype)) for path, leaf in flat)
  return graphdef, _draw_params(key, treedef, specs)


def init_autoencoder(key: jax.Array, cfg: AutoencoderConfig) -> Tuple[nnx.GraphDef, Params]:
  """Builds a deterministic autoencoder.

  Args:
    key: a typed PRNG key (``jax.random.key(seed)``); may be a tracer under ``vmap``.
    cfg: the architecture.

  Returns:
    ``(graphdef, params)``: the static graph definition and a nested dict of parameter arrays.
  """
  return _build(_Autoencoder, cfg, key)


def init_vae(key: jax.Array, cfg: AutoencoderConfig) -> Tuple[nnx.GraphDef, Params]:
  """Builds a Gaussian-prior VAE with the same encoder/decoder shapes as :func:`init_autoencoder`.

  Args:
    key: a typed PRNG key (``jax.random.key(seed)``).
    cfg: the architecture; ``latent_dim`` is the dimension of the Gaussian latent.

  Returns:
    ``(graphdef, params)``.
  """
  return _build(_VAE, cfg, key)


def init_classifier(key: jax.Array, cfg: ClassifierConfig) -> Tuple[nnx.GraphDef, Params]:
  """Builds the evaluation classifier.

  Args:
    key: a typed PRNG key (``jax.random.key(seed)``).
    cfg: the architecture.

  Returns:
    ``(graphdef, params)``.
  """
  return _build(_Classifier, cfg, key)


def encode(graphdef: nnx.GraphDef, params: Params, x: jax.Array) -> jax.Array:
  """Latent codes of a batch (the posterior mean for a VAE).

  Args:
    graphdef: from :func:`init_autoencoder` or :func:`init_vae`.
    params: the matching parameters.
    x: Array of shape [B, *input_shape].

  Returns:
    Array of shape [B, latent_dim].
  """
  model = nnx.merge(graphdef, params)
  _check_batch(x, model.cfg.input_shape, "encode")
  return model.encode(x)


def decode_logits(graphdef: nnx.GraphDef, params: Params, z: jax.Array) -> jax.Array:
  """Decoder outputs before the final sigmoid (equal to :func:`decode` for linear outputs).

  Args:
    graphdef: from :func:`init_autoencoder` or :func:`init_vae`.
    params: the matching parameters.
    z: Array of shape [B, latent_dim].

  Returns:
    Array of shape [B, *input_shape].
  """
  model = nnx.merge(graphdef, params)
  _check_batch(z, (model.cfg.latent_dim,), "decode")
  return model.decoder(z)


def decode(graphdef: nnx.GraphDef, params: Params, z: jax.Array) -> jax.Array:
  """Decodes latent codes: images through a sigmoid (values in [0, 1]), points linearly.

  Args:
    graphdef: from :func:`init_autoencoder` or :func:`init_vae`.
    params: the matching parameters.
    z: Array of shape [B, latent_dim].

  Returns:
    Array of shape [B, *input_shape].
  """
  model = nnx.merge(graphdef, params)
  out = decode_logits(graphdef, params, z)
  return jax.nn.sigmoid(out) if model.cfg.is_image else out


def autoencoder_loss(graphdef: nnx.GraphDef, params: Params, x: jax.Array, *,
                     code_penalty: float = 0.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Reconstruction MSE plus an optional small penalty on the code norm.

  ``loss = mean((D(E(x)) - x)^2) + code_penalty * mean_b |E(x_b)|^2``. No prior is imposed on the codes.

  Args:
    graphdef: from :func:`init_autoencoder`.
    params: its parameters.
    x: Array of shape [B, *input_shape].
    code_penalty: weight of the squared code norm.

  Returns:
    ``(loss, aux)`` with scalar ``loss`` and ``aux = {"mse": ..., "code_norm2": ...}``.
  """
  z = encode(graphdef, params, x)
  x_hat = decode(graphdef, params, z)
  mse = jnp.mean(jnp.square(x_hat - x))
  code_norm2 = jnp.mean(jnp.sum(jnp.square(z), axis=-1))
  return mse + code_penalty * code_norm2, {"mse": mse, "code_norm2": code_norm2}


def vae_encode(graphdef: nnx.GraphDef, params: Params, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Posterior mean and log-variance.

  Args:
    graphdef: from :func:`init_vae`.
    params: its parameters.
    x: Array of shape [B, *input_shape].

  Returns:
    ``(mean, logvar)``, each an Array of shape [B, latent_dim].
  """
  model = nnx.merge(graphdef, params)
  if not isinstance(model, _VAE):
    raise ValueError("vae_encode needs a graphdef from init_vae.")
  _check_batch(x, model.cfg.input_shape, "vae_encode")
  return model.moments(x)


def vae_loss(graphdef: nnx.GraphDef, params: Params, key: jax.Array, x: jax.Array, *, beta: float = 1.0,
             obs_std: float = 0.1) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Negative ELBO per example (mean over the batch), with one reparameterised sample.

  Images use a Bernoulli likelihood (binary cross-entropy on the decoder logits, summed over pixels);
  points use a Gaussian likelihood with fixed standard deviation ``obs_std`` (up to a constant). The KL term
  is the closed form ``KL(N(mean, exp(logvar)) || N(0, I))``.

  Args:
    graphdef: from :func:`init_vae`.
    params: its parameters.
    key: PRNG key for the reparameterisation noise.
    x: Array of shape [B, *input_shape].
    beta: weight of the KL term (1 is the ELBO).
    obs_std: observation noise of the Gaussian likelihood (points only).

  Returns:
    ``(loss, aux)`` with ``aux = {"recon": ..., "kl": ...}`` (batch means).
  """
  model = nnx.merge(graphdef, params)
  mean, logvar = vae_encode(graphdef, params, x)
  eps = jax.random.normal(key, mean.shape, mean.dtype)
  z = mean + jnp.exp(0.5 * logvar) * eps
  out = model.decoder(z).reshape(x.shape[0], -1)
  target = x.reshape(x.shape[0], -1)
  if model.cfg.is_image:
    nll = jnp.sum(jnp.logaddexp(0.0, out) - target * out, axis=-1)
  else:
    nll = 0.5 * jnp.sum(jnp.square(out - target), axis=-1) / obs_std**2
  kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)
  recon, kl = jnp.mean(nll), jnp.mean(kl)
  return recon + beta * kl, {"recon": recon, "kl": kl}


def vae_sample(graphdef: nnx.GraphDef, params: Params, key: jax.Array, num: int) -> jax.Array:
  """Samples from the VAE: z ~ N(0, I), decoded (the decoder mean, no observation noise).

  Args:
    graphdef: from :func:`init_vae`.
    params: its parameters.
    key: PRNG key.
    num: number of samples.

  Returns:
    Array of shape [num, *input_shape].
  """
  model = nnx.merge(graphdef, params)
  z = jax.random.normal(key, (num, model.cfg.latent_dim))
  return decode(graphdef, params, z)


def classifier_apply(graphdef: nnx.GraphDef, params: Params, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Logits and penultimate features.

  Args:
    graphdef: from :func:`init_classifier`.
    params: its parameters.
    x: Array of shape [B, *input_shape].

  Returns:
    ``(logits, features)``: Arrays of shape [B, num_classes] and [B, feature_dim].
  """
  model = nnx.merge(graphdef, params)
  if not isinstance(model, _Classifier):
    raise ValueError("classifier_apply needs a graphdef from init_classifier.")
  return model(x)


def classifier_logits(graphdef: nnx.GraphDef, params: Params, x: jax.Array) -> jax.Array:
  """Class logits, Array of shape [B, num_classes], for x of shape [B, *input_shape]."""
  return classifier_apply(graphdef, params, x)[0]


def classifier_features(graphdef: nnx.GraphDef, params: Params, x: jax.Array) -> jax.Array:
  """Penultimate features (the evaluation feature space), Array of shape [B, feature_dim]."""
  return classifier_apply(graphdef, params, x)[1]


def classifier_loss(graphdef: nnx.GraphDef, params: Params, x: jax.Array,
                    labels: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Softmax cross-entropy.

  Args:
    graphdef: from :func:`init_classifier`.
    params: its parameters.
    x: Array of shape [B, *input_shape].
    labels: int Array of shape [B].

  Returns:
    ``(loss, aux)`` with ``aux = {"accuracy": ...}``.
  """
  logits = classifier_logits(graphdef, params, x)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return jnp.mean(nll), {"accuracy": accuracy}
