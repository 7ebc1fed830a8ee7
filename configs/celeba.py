r"""CelebA 64x64: conv AE (latent 64) -> Brenier potential on all training codes. Sized for a GPU/TPU.

Data, either of:
  * TFDS ``celeb_a`` prepared as array_record on a networked machine:
      tfds build celeb_a --file_format=array_record --data_dir=DIR
    then ``--config.data.data_dir=DIR`` (images are centre-cropped to 140 and resized to 64x64);
  * a folder of aligned JPEGs (img_align_celeba): ``--config.data.name=celeba_folder
    --config.data.data_dir=/path/to/img_align_celeba``.
Without the data the run stops within seconds printing the command above.

CelebA has no class labels, so the metrics are computed on 4x4 average-pooled pixels (16x16x3 = 768
features): Frechet distance, precision/recall/density/coverage, Sinkhorn divergence, memorisation.

Command:
  python launch.py --config configs/celeba.py --workdir runs/celeba --config.data.data_dir=DIR
  python launch.py --config configs/celeba.py:smoke --workdir /tmp/celeba_smoke --config.data.data_dir=DIR
  # Step-size x seed scan of the OT fit on the same codes (runs the AE first if needed; writes scan/scan.md):
  python launch.py --config configs/celeba.py --workdir runs/celeba --config.data.data_dir=DIR \
      --scan ot.learning_rate=0.3,1.0,3.0 --scan seed=0,1,2
  # Several hosts (same command on each, I = 0..P-1): add
  #   --coordinator_address=HOST0:PORT --num_processes=P --process_id=I

Expected runtime: not measured (no CelebA copy and no accelerator on the build machine); the smoke variant
runs in a few minutes on a CPU. Expected metrics: not measured yet (no CelebA copy on the build machine: it
has no internet access to fetch one, and the full run is sized for an accelerator).
"""
from lsot_jax import config as config_lib


def get_config(arg=None):
  """The CelebA config; ``arg="smoke"`` (or ``"runlocal"``) shrinks it to a CPU-sized plumbing check."""
  config = config_lib.default_config()
  config.data.name = "celeb_a"
  config.data.num_train = 0
  config.data.num_test = 10000
  config.data.image_size = 64
  config.ae.kind = "conv64"
  config.ae.latent_dim = 64
  config.ae.widths = (32, 64, 128, 256)
  config.ae.epochs = 20
  config.ae.batch_size = 128
  config.ae.learning_rate = 1e-3
  config.ae.checkpoint_every = 1000
  config.ot.num_codes = 0
  config.ot.num_iterations = 5000
  config.ot.batch_size = 16384
  config.ot.max_batch_size = 262144
  config.ot.checkpoint_every = 200
  config.ot.marginal_samples = 1 << 22
  config.ot.num_devices = 0  # Shard the codes over every device JAX sees (one on a single-device machine).
  config.sample.methods = ("exact", "extended", "soft", "gaussian", "gmm", "sinkhorn", "wgan_gp", "vae")
  config.sample.num_samples = 10000
  config.sample.num_seeds = 1
  config.sample.grid_size = 64
  config.sample.sinkhorn_max_codes = 8192
  config.sample.wgan_steps = 20000
  config.sample.vae_epochs = 20
  config.eval.metrics = ("frechet", "prdc", "sinkhorn", "memorisation")
  config.eval.feature_space = "pixels"
  config.eval.pixel_pool = 4
  config.eval.num_real = 10000
  if arg in ("smoke", "runlocal"):
    config.data.num_train = 512
    config.data.num_test = 256
    config.ae.epochs = 1
    config.ae.batch_size = 64
    config.ae.checkpoint_every = 4
    config.ot.num_iterations = 40
    config.ot.batch_size = 4096
    config.ot.max_batch_size = 4096
    config.ot.checkpoint_every = 20
    config.ot.marginal_samples = 16384
    config.ot.newton.min_samples = 1 << 14
    config.ot.newton.max_samples = 1 << 15
    config.sample.methods = ("exact", "extended", "gaussian")
    config.sample.num_samples = 256
    config.sample.grid_size = 16
    config.sample.wgan_steps = 20
    config.sample.vae_epochs = 1
    config.eval.num_real = 256
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'smoke' or nothing.")
  return config
