r"""scikit-learn's bundled 8x8 digits (1,500 training / 297 test images): a real image set that needs nothing.

An MLP autoencoder (latent dimension 8) on the 64-pixel images; the Brenier potential is fitted to all
training codes; metrics in the feature space of a small CNN trained on the same digits.

Command:
  python launch.py --config configs/digits.py --workdir runs/digits
  python launch.py --config configs/digits.py:smoke --workdir /tmp/digits_smoke   # under a minute

Expected runtime: 5.9 minutes wall, of which 332 s in the stages (at commit b13b6e4, on a 2-core Intel Xeon
shared with other jobs: AE 52 s, OT 84 s = 200 Adam steps, sampling 167 s of which the VAE 79 s and WGAN-GP 50 s,
evaluation 29 s including the classifier); the smoke variant under a minute.

Expected metrics: AE held-out reconstruction MSE 0.0152; the OT fit converged in 200 steps at L1 marginal
error 0.070 (Monte-Carlo noise floor 0.060); 297 samples per method (one sampling seed) against the 297 test
images, in the features of the CNN (test accuracy 0.936). The table is that run's, published by
``python benchmarks/publish_run.py --workdir /tmp/digits8 --name digits --config digits --commit b13b6e4
--update_docs`` as docs/results/digits/table.md:

  | method | Frechet distance | precision | recall | density | coverage | memorisation |
  |---|---|---|---|---|---|---|
  | LSOT exact | 16.8 | 0.939 | 0.889 | 0.893 | 0.892 | 0.997 |
  | LSOT extended | 22.19 | 0.943 | 0.916 | 0.817 | 0.886 | 0.791 |
  | LSOT soft | 18.33 | 0.946 | 0.892 | 0.840 | 0.852 | 0.855 |
  | AE + Gaussian | 29.12 | 0.771 | 0.973 | 0.505 | 0.673 | 0.118 |
  | AE + GMM | 28.32 | 0.909 | 0.926 | 0.773 | 0.889 | 0.535 |
  | AE + Sinkhorn map (ott) | 23.24 | 0.936 | 0.939 | 0.908 | 0.933 | 0.741 |
  | AE + latent WGAN-GP | 25.05 | 0.919 | 0.939 | 0.780 | 0.862 | 0.572 |
  | VAE | 30.49 | 0.949 | 0.606 | 0.964 | 0.882 | 0.529 |

One seed of 297 samples: the figures are noisy and have no standard error. ``extended`` has a lower Frechet
distance than every baseline (1.0 below the Sinkhorn map, 2.9 below WGAN-GP) and a higher precision than all
but the VAE; its recall (0.916) is below that of four baselines.
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
