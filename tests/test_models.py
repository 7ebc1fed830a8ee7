"""Tests for lsot_jax.models: shapes, output ranges, vmapped inits, and the VAE loss against references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from flax import nnx

from lsot_jax import models

AE_CASES = [
    ("mlp", (2,), False),
    ("mlp", (8, 8, 1), True),
    ("conv28", (28, 28, 1), True),
    ("conv64", (64, 64, 3), True),
]


@pytest.mark.parametrize("kind,shape,is_image", AE_CASES)
@pytest.mark.parametrize("init", [models.init_autoencoder, models.init_vae])
def test_encode_decode_shapes_and_range(kind, shape, is_image, init, rng, np_rng):
  cfg = models.AutoencoderConfig(kind=kind, input_shape=shape, latent_dim=5)
  graphdef, params = init(rng, cfg)
  x = jnp.asarray(np_rng.uniform(size=(3,) + shape), jnp.float32)
  z = models.encode(graphdef, params, x)
  assert z.shape == (3, 5)
  out = models.decode(graphdef, params, z)
  assert out.shape == (3,) + shape
  logits = models.decode_logits(graphdef, params, z)
  expected = special.expit(np.asarray(logits)) if is_image else np.asarray(logits)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
  if is_image:
    assert cfg.is_image and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("kind,bottleneck", [("conv28", (7, 7)), ("conv64", (4, 4))])
def test_conv_stages_reach_expected_bottleneck(kind, bottleneck, rng):
  cfg = models.AutoencoderConfig(kind=kind, latent_dim=6)
  _, params = models.init_autoencoder(rng, cfg)
  flat = bottleneck[0] * bottleneck[1] * cfg.widths[-1]
  assert params["encoder"]["out"]["kernel"].shape == (flat, 6)
  assert params["decoder"]["inp"]["kernel"].shape == (6, flat)


def test_vmap_init_over_keys_matches_separate_inits(rng):
  cfg = models.AutoencoderConfig(kind="conv28", latent_dim=4)
  keys = jax.random.split(rng, 2)
  graphdef, batched = jax.vmap(lambda k: models.init_autoencoder(k, cfg))(keys)
  x = jnp.linspace(0.0, 1.0, 2 * 28 * 28, dtype=jnp.float32).reshape(2, 28, 28, 1)
  codes = jax.vmap(models.encode, in_axes=(None, 0, None))(graphdef, batched, x)
  assert codes.shape == (2, 2, 4)
  for i in range(2):
    _, single = models.init_autoencoder(keys[i], cfg)
    jax.tree.map(lambda b, s, i=i: np.testing.assert_allclose(b[i], s, rtol=1e-6, atol=1e-7), batched, single)
    np.testing.assert_allclose(codes[i], models.encode(graphdef, single, x), rtol=1e-4, atol=1e-5)
  assert not np.allclose(batched["encoder"]["out"]["kernel"][0], batched["encoder"]["out"]["kernel"][1])


def test_init_rejects_int_seed():
  with pytest.raises(ValueError, match="jax.random.key"):
    models.init_autoencoder(0, models.AutoencoderConfig(input_shape=(2,)))


def test_jit_with_static_graphdef_matches_eager(rng):
  cfg = models.AutoencoderConfig(kind="mlp", input_shape=(2,), latent_dim=2)
  graphdef, params = models.init_autoencoder(rng, cfg)
  x = jnp.array([[0.5, -1.0], [2.0, 0.25]], jnp.float32)
  jitted = jax.jit(models.encode, static_argnums=0)(graphdef, params, x)
  np.testing.assert_allclose(jitted, models.encode(graphdef, params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [
    dict(kind="conv28", widths=(8, 16, 32)),
    dict(kind="conv64", input_shape=(60, 60, 3)),
    dict(kind="conv28", input_shape=(28, 28)),
    dict(kind="transformer"),
    dict(kind="mlp", input_shape=(2,), latent_dim=0),
    dict(kind="mlp"),
])
def test_autoencoder_config_validation(bad):
  with pytest.raises(ValueError):
    models.AutoencoderConfig(**bad)


def test_encode_rejects_wrong_input_shape(rng):
  graphdef, params = models.init_autoencoder(rng, models.AutoencoderConfig(input_shape=(2,)))
  with pytest.raises(ValueError, match="shape"):
    models.encode(graphdef, params, jnp.zeros((4, 3)))


def test_autoencoder_loss_matches_numpy(rng, np_rng):
  cfg = models.AutoencoderConfig(kind="mlp", input_shape=(2,), latent_dim=3)
  graphdef, params = models.init_autoencoder(rng, cfg)
  x = jnp.asarray(np_rng.normal(size=(6, 2)), jnp.float32)
  loss, aux = models.autoencoder_loss(graphdef, params, x, code_penalty=0.5)
  z = np.asarray(models.encode(graphdef, params, x), np.float64)
  x_hat = np.asarray(models.decode(graphdef, params, jnp.asarray(z, jnp.float32)), np.float64)
  expected = np.mean((x_hat - np.asarray(x)) ** 2) + 0.5 * np.mean(np.sum(z**2, axis=1))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(aux["code_norm2"]), np.mean(np.sum(z**2, axis=1)), rtol=1e-5)


def _kl_by_quadrature(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) for independent coordinates, by numerical integration."""
  total = 0.0
  for m, lv in zip(mean, logvar):
    s = math.exp(0.5 * lv)
    p, q = stats.norm(m, s), stats.norm(0.0, 1.0)
    val, _ = integrate.quad(lambda t: p.pdf(t) * (p.logpdf(t) - q.logpdf(t)), m - 12 * s, m + 12 * s)
    total += val
  return total


def test_vae_loss_terms_match_references(rng, np_rng):
  cfg = models.AutoencoderConfig(kind="mlp", input_shape=(8, 8, 1), latent_dim=2, widths=(16,))
  graphdef, params = models.init_vae(rng, cfg)
  x = jnp.asarray(np_rng.uniform(size=(1, 8, 8, 1)), jnp.float32)
  key = jax.random.key(7)
  loss, aux = models.vae_loss(graphdef, params, key, x, beta=0.5)
  mean, logvar = (np.asarray(a, np.float64)[0] for a in models.vae_encode(graphdef, params, x))
  np.testing.assert_allclose(float(aux["kl"]), _kl_by_quadrature(mean, logvar), rtol=1e-4, atol=1e-6)
  eps = np.asarray(jax.random.normal(key, (1, 2)))
  z = jnp.asarray(mean + np.exp(0.5 * logvar) * eps[0], jnp.float32)[None]
  logits = np.asarray(models.decode_logits(graphdef, params, z), np.float64).ravel()
  prob, target = special.expit(logits), np.asarray(x, np.float64).ravel()
  bce = -np.sum(target * np.log(prob) + (1 - target) * np.log1p(-prob))
  np.testing.assert_allclose(float(aux["recon"]), bce, rtol=1e-4)
  np.testing.assert_allclose(float(loss), bce + 0.5 * float(aux["kl"]), rtol=1e-5)


def test_vae_gaussian_likelihood_for_points(rng):
  cfg = models.AutoencoderConfig(kind="mlp", input_shape=(2,), latent_dim=2, widths=(8,))
  graphdef, params = models.init_vae(rng, cfg)
  x = jnp.array([[0.3, -0.2]], jnp.float32)
  key = jax.random.key(3)
  _, aux = models.vae_loss(graphdef, params, key, x, obs_std=0.5)
  mean, logvar = models.vae_encode(graphdef, params, x)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, (1, 2))
  x_hat = np.asarray(models.decode(graphdef, params, z), np.float64)[0]
  # -log N(x; x_hat, 0.25 I) up to the constant log(2 pi 0.25).
  expected = -stats.multivariate_normal(x_hat, 0.25 * np.eye(2)).logpdf(np.asarray(x[0])) - math.log(
      2 * math.pi * 0.25)
  np.testing.assert_allclose(float(aux["recon"]), expected, rtol=1e-4)


def test_vae_sample_shape_range_and_determinism(rng):
  cfg = models.AutoencoderConfig(kind="conv28", latent_dim=3)
  graphdef, params = models.init_vae(rng, cfg)
  a = models.vae_sample(graphdef, params, jax.random.key(1), 4)
  b = models.vae_sample(graphdef, params, jax.random.key(1), 4)
  c = models.vae_sample(graphdef, params, jax.random.key(2), 4)
  assert a.shape == (4, 28, 28, 1)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("kind,shape,widths", [
    ("cnn", (28, 28, 1), (8, 16)),
    ("cnn", (64, 64, 3), (8, 16, 16, 16)),
    ("mlp", (8, 8, 1), (32,)),
])
def test_classifier_outputs(kind, shape, widths, rng, np_rng):
  cfg = models.ClassifierConfig(kind=kind, input_shape=shape, widths=widths, feature_dim=24, num_classes=7)
  graphdef, params = models.init_classifier(rng, cfg)
  x = jnp.asarray(np_rng.uniform(size=(5,) + shape), jnp.float32)
  logits, feats = models.classifier_apply(graphdef, params, x)
  assert logits.shape == (5, 7) and feats.shape == (5, 24)
  assert float(feats.min()) >= 0.0
  np.testing.assert_allclose(models.classifier_features(graphdef, params, x), feats, rtol=1e-6)
  # The head is linear in the features: logits = feats @ W + b.
  head = params["head"]
  np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"][None, :], rtol=1e-4, atol=1e-5)
  labels = jnp.array([0, 1, 2, 3, 6])
  loss, aux = models.classifier_loss(graphdef, params, x, labels)
  logp = special.log_softmax(np.asarray(logits, np.float64), axis=1)
  np.testing.assert_allclose(float(loss), -np.mean(logp[np.arange(5), np.asarray(labels)]), rtol=1e-5)
  assert 0.0 <= float(aux["accuracy"]) <= 1.0


def test_init_is_lecun_normal(rng):
  cfg = models.AutoencoderConfig(kind="conv28", latent_dim=16)
  _, params = models.init_autoencoder(rng, cfg)
  for name, layer in params["encoder"].items():
    kernel = np.asarray(layer["kernel"], np.float64)
    fan_in = np.prod(kernel.shape[:-1])
    np.testing.assert_allclose(kernel.std() * np.sqrt(fan_in), 1.0, rtol=0.1, err_msg=name)
    assert np.abs(kernel).max() <= 2.0 / 0.8796 / np.sqrt(fan_in) + 1e-6
    assert abs(stats.skew(kernel.ravel())) < 0.2
    np.testing.assert_array_equal(layer["bias"], 0.0)


@pytest.mark.parametrize("channels,size", [((64, 32), 7), ((32, 1), 14), ((3, 5), 4)])
def test_conv_transpose_stride2_matches_flax_conv_transpose(channels, size, np_rng):
  """The matmul form equals flax's own transposed convolution (values and gradients) on the same kernel."""
  c, o = channels
  layer = nnx.ConvTranspose(c, o, (4, 4), strides=2, padding="SAME", rngs=nnx.Rngs(0))
  kernel = layer.kernel[...]
  x = jnp.asarray(np_rng.standard_normal((3, size, size, c)), jnp.float32)
  reference = layer(x) - layer.bias[...].reshape(1, 1, 1, -1)
  got = models.conv_transpose_stride2(x, kernel)
  assert got.shape == (3, 2 * size, 2 * size, o)
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)

  def flax_loss(kernel, x):
    return jnp.sum(jnp.sin(jax.lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))))

  def our_loss(kernel, x):
    return jnp.sum(jnp.sin(models.conv_transpose_stride2(x, kernel)))

  for want, have in zip(jax.grad(flax_loss, (0, 1))(kernel, x), jax.grad(our_loss, (0, 1))(kernel, x)):
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)


def test_conv_decoder_uses_its_conv_transpose_parameters(rng, np_rng):
  """decode() equals the decoder rebuilt from flax layers holding the same parameters."""
  cfg = models.AutoencoderConfig(kind="conv28", latent_dim=4, widths=(8, 16))
  graphdef, params = models.init_autoencoder(rng, cfg)
  z = jnp.asarray(np_rng.standard_normal((2, 4)), jnp.float32)
  model = nnx.merge(graphdef, params)
  dec = model.decoder
  h = jax.nn.relu(dec.inp(z)).reshape((2, 7, 7, 16))
  h = jax.nn.relu(dec.deconv0(h))
  reference = jax.nn.sigmoid(dec.deconv1(h))
  np.testing.assert_allclose(models.decode(graphdef, params, z), reference, rtol=1e-5, atol=1e-5)
