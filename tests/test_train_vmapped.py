"""Tests for lsot_jax.train.train_autoencoders_vmapped: each vmapped setting equals train_autoencoder run alone.

The reference for every setting is :func:`lsot_jax.train.train_autoencoder` with the same ``TrainConfig``
and code penalty (its own compiled step, one setting, checkpointed): parameters and per-epoch losses must
agree to float32 reordering tolerance, and a diverging setting must be marked at the step where the
reference raises, without disturbing the others.
"""
import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from lsot_jax import models, train

SMALL_AE = models.AutoencoderConfig(kind="mlp", input_shape=(8, 8, 1), latent_dim=8, widths=(64, 32))


@pytest.fixture(scope="module")
def digits():
  d = load_digits()
  return (d.images / 16.0).astype(np.float32)[..., None][:300]


def _cfg(**kwargs):
  """A TrainConfig that checkpoints only at the end (the reference runs stay fast)."""
  return train.TrainConfig(checkpoint_every=1000, **kwargs)


def _setting(params, i):
  return jax.tree.map(lambda a: np.asarray(a[i]), params)


def _assert_matches_one_by_one(x, cfgs, penalties, out, tmp_path):
  for i, (cfg, penalty) in enumerate(zip(cfgs, penalties)):
    _, params, history = train.train_autoencoder(x, SMALL_AE, str(tmp_path / f"ref{i}"), cfg,
                                                 code_penalty=penalty, progress=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 _setting(out.params, i), params)
    np.testing.assert_allclose(out.epoch_losses[i], [h["loss"] for h in history], rtol=1e-5)
  assert (out.diverged_step == -1).all()


def test_constant_schedule_settings_equal_one_by_one(digits, tmp_path):
  """Different learning rates, seeds, weight decays (Adam and AdamW) and code penalties in one call."""
  cfgs = [_cfg(seed=0, epochs=3, batch_size=64, learning_rate=3e-3),
          _cfg(seed=1, epochs=3, batch_size=64, learning_rate=1e-3, weight_decay=0.05)]
  penalties = [0.0, 0.01]
  logged = []
  out = train.train_autoencoders_vmapped(digits, SMALL_AE, cfgs, code_penalties=penalties,
                                         log=lambda epoch, losses: logged.append((epoch, losses)))
  assert out.epoch_losses.shape == (2, 3) and [e for e, _ in logged] == [1, 2, 3]
  np.testing.assert_array_equal(np.stack([l for _, l in logged], axis=1), out.epoch_losses)
  np.testing.assert_array_equal(out.final_loss, out.epoch_losses[:, -1])
  assert jax.tree.leaves(out.params)[0].shape[0] == 2
  _assert_matches_one_by_one(digits, cfgs, penalties, out, tmp_path)
  # The settings do differ (a bug that trained setting 0 twice would pass the comparison above only here).
  assert not np.allclose(_setting(out.params, 0)["decoder"]["out"]["kernel"],
                         _setting(out.params, 1)["decoder"]["out"]["kernel"], atol=1e-3)


def test_cosine_schedule_and_clipped_batch_equal_one_by_one(digits, tmp_path):
  """Cosine decay over the steps, and a batch size above N (clipped to N: one step per epoch)."""
  x = digits[:120]
  cfgs = [_cfg(seed=2, epochs=4, batch_size=500, learning_rate=5e-3, lr_schedule="cosine"),
          _cfg(seed=3, epochs=4, batch_size=500, learning_rate=2e-3, lr_schedule="cosine",
                            weight_decay=0.1)]
  out = train.train_autoencoders_vmapped(x, SMALL_AE, cfgs)
  _assert_matches_one_by_one(x, cfgs, [0.0, 0.0], out, tmp_path)


def test_a_diverging_setting_is_marked_and_the_others_are_unaffected(digits, tmp_path):
  cfgs = [_cfg(seed=0, epochs=2, batch_size=64, learning_rate=1e30),
          _cfg(seed=0, epochs=2, batch_size=64, learning_rate=2e-3)]
  out = train.train_autoencoders_vmapped(digits, SMALL_AE, cfgs)
  with pytest.raises(train.TrainingDiverged) as info:
    train.train_autoencoder(digits, SMALL_AE, str(tmp_path / "alone"), cfgs[0], progress=False)
  assert out.diverged_step.tolist() == [info.value.step, -1]
  assert np.isnan(out.epoch_losses[0]).all() and np.isfinite(out.epoch_losses[1]).all()
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(_setting(out.params, 0)))  # frozen before the step
  _, params, _ = train.train_autoencoder(digits, SMALL_AE, str(tmp_path / "ok"), cfgs[1], progress=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               _setting(out.params, 1), params)


def test_static_fields_must_agree(digits):
  with pytest.raises(ValueError, match="epochs, batch_size, lr_schedule"):
    train.train_autoencoders_vmapped(digits, SMALL_AE, [train.TrainConfig(epochs=1), train.TrainConfig(epochs=2)])
  with pytest.raises(ValueError, match="max_steps"):
    train.train_autoencoders_vmapped(digits, SMALL_AE, [train.TrainConfig(max_steps=3)])
  with pytest.raises(ValueError, match="code_penalties"):
    train.train_autoencoders_vmapped(digits, SMALL_AE, [train.TrainConfig()], code_penalties=[0.1, 0.2])
