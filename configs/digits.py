r"""scikit-learn's bundled 8x8 digits (1,500 training / 297 test images): a real image set that needs nothing.

An MLP autoencoder (latent dimension 8) on the 64-pixel images; the Brenier potential is fitted to all
training codes; metrics in the feature space of a small CNN trained on the same digits.

Command:
  python launch.py --config configs/digits.py --workdir runs/digits
  python launch.py --config configs/digits.py:smoke --workdir /tmp/digits_smoke   # under a minute

Expected runtime (2-core CPU): a few minutes. Expected metrics: not measured yet.
"""
from lsot_jax import config as config_lib


def get_config(arg=None):
  """The digits config; ``arg="smoke"`` (or ``"runlocal"``) shrinks everything."""
  config = config_lib.default_config()
  config.data.name = "digits"
  config.data.num_train = 0
  config.data.num_test = 0
  config.ae.kind = "mlp"
  config.ae.latent_dim = 8
  config.ae.widths = (256, 128)
  config.ae.epochs = 200
  config.ae.batch_size = 64
  config.ae.learning_rate = 1e-3
  config.ot.num_iterations = 600
  config.ot.max_batch_size = 65536
  config.ot.checkpoint_every = 50
  config.sample.methods = ("exact", "extended", "soft", "gaussian", "gmm", "sinkhorn", "wgan_gp", "vae")
  config.sample.num_samples = 297
  config.sample.num_seeds = 1
  config.sample.grid_size = 100
  config.sample.wgan_steps = 2000
  config.sample.vae_epochs = 200
  config.eval.metrics = ("frechet", "prdc", "sinkhorn", "memorisation")
  config.eval.feature_space = "classifier"
  config.eval.classifier_epochs = 30
  config.eval.classifier_batch_size = 64
  if arg in ("smoke", "runlocal"):
    config.data.num_train = 256
    config.ae.epochs = 2
    config.ae.checkpoint_every = 2
    config.ot.num_iterations = 40
    config.ot.max_batch_size = 4096
    config.ot.checkpoint_every = 20
    config.ot.marginal_samples = 16384
    config.ot.newton.min_samples = 1 << 14
    config.ot.newton.max_samples = 1 << 15
    config.sample.methods = ("exact", "extended", "gaussian")
    config.sample.num_samples = 128
    config.sample.grid_size = 16
    config.eval.classifier_epochs = 2
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'smoke' or nothing.")
  return config
