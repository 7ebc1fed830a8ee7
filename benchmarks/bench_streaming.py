"""Peak host memory (RSS), in-memory loaders vs grain streams: one epoch, a full run.

Six cases, each in its own subprocess so that every peak is its own
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``folder_before``: ``data.load_dataset("celeba_folder", "train", ...)`` on a
  synthetic folder of ``--num_files`` 64 x 64 JPEGs (generated once under
  ``--folder``, with a partition file that puts every file in ``train``);
* ``folder_after``: the same files through ``streaming.image_source`` +
  ``image_stream`` (batch ``--batch_size``, shuffled, default threads);
* ``tfds_before`` / ``tfds_after``: ``tfds.testing.mock_data`` with
  ``--num_examples`` examples of ``--tfds_name`` (default ``mnist``: 28 x 28 x 1;
  ``celeb_a`` would need ~50 KB of float32 per example in memory before),
  read by ``data.load_dataset`` and by the stream.
* ``run_before`` / ``run_after``: a full run, every stage (``pipeline.run``:
  ae, encode, ot, sample with the VAE baseline, eval with classifier features
  and the memorisation rate), on the same mock ``tfds:<--tfds_name>`` with
  ``--num_examples`` training and ``--run_num_test`` test examples, with
  ``data.stream`` off (the splits loaded) and on (every stage streams);
  small models and one epoch each (:func:`run_config`), so that the data
  dominates memory. They report the run's metrics too: the two agree.

Each read case reports its peak RSS, the RSS after its imports (grain imports JAX,
the in-memory path does not), the wall time, and the sum of all pixels (the
same data is read either way: the sums agree to float32 rounding).

Usage:
  python benchmarks/bench_streaming.py                        # 50,000 files, 200,000 examples
  python benchmarks/bench_streaming.py --num_files 5000 --num_examples 20000   # quick
  python benchmarks/bench_streaming.py --cases run_before,run_after           # full runs only

Results: ``benchmarks/results/streaming_rss.{json,md}`` (reading one epoch)
and ``benchmarks/results/streaming_run_rss.{json,md}`` (full runs).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
READ_CASES = ("folder_before", "folder_after", "tfds_before", "tfds_after")
RUN_CASES = ("run_before", "run_after")
CASES = READ_CASES + RUN_CASES


def cpu_name() -> str:
  from lsot_jax import publish  # pylint: disable=g-import-not-at-top
  return publish.cpu_model() or platform.processor() or platform.machine()


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_folder(folder: str, num_files: int) -> float:
  """Writes num_files smooth random 64 x 64 JPEGs (once); returns seconds."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  done = os.path.join(folder, f".complete_{num_files}")
  if os.path.exists(done):
    return 0.0
  start = time.perf_counter()
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  names = []
  for i in range(num_files):
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = np.kron(coarse, np.ones((8, 8, 1), np.uint8))
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255)
    name = f"{i + 1:06d}.jpg"
    Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, name),
                                                 quality=90)
    names.append(name)
  with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
    f.writelines(f"{n} 0\n" for n in names)
  with open(done, "w") as f:
    f.write("ok\n")
  return time.perf_counter() - start


def _tfds_mock(num_examples: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class BoundGetitemsMock(tfds.testing.PickableDataSourceMock):
    """Binds the mock's ``__getitems__`` (tfds 4.9.10 leaves it unbound)."""

    def __setattr__(self, name, value):
      if name == "__getitems__" and isinstance(value, functools.partial):
        value = functools.partial(value, self)
      super().__setattr__(name, value)

  return tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE,
      mock_array_record_data_source=BoundGetitemsMock())


def run_config(tfds_name: str, num_train: int, num_test: int, stream: bool):
  """The full run's config: every stage, small models, one epoch each.

  MLP autoencoder (latent 8), Adam OT fitted to 10,000 of the codes (all of
  them when there are fewer), the
  ``exact`` and ``vae`` methods (1,000 samples), classifier features with
  the Frechet distance and the memorisation rate (100 samples against every
  training example's features, 1,000 held-out examples).
  """
  from lsot_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  c.data.name, c.data.num_train, c.data.num_test = f"tfds:{tfds_name}", 0, num_test
  c.data.stream = stream
  c.ae.kind, c.ae.latent_dim, c.ae.widths = "mlp", 8, (128,)
  c.ae.epochs, c.ae.batch_size = 1, 256
  c.ot.num_codes, c.ot.num_iterations = min(10_000, num_train), 200
  c.sample.methods, c.sample.num_samples, c.sample.num_seeds = ("exact", "vae"), 1000, 1
  c.sample.vae_epochs = 1
  c.eval.metrics, c.eval.feature_space = ("frechet", "memorisation"), "classifier"
  c.eval.classifier_epochs, c.eval.num_real, c.eval.memorisation_points = 1, 1000, 100
  c.log.progress, c.log.tensorboard = False, False
  return c


def run_pipeline_case(args) -> dict:
  """A full run (``run_before``: in memory, ``run_after``: streamed) in a
  fresh workdir, inside the TFDS mock; returns its measurements."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  from lsot_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = run_config(args.tfds_name, args.num_examples, args.run_num_test,
                      stream=args.case == "run_after")
  imports_rss = peak_rss_mib()
  workdir = tempfile.mkdtemp(prefix="lsot_bench_run_")
  lines = []
  start = time.perf_counter()
  try:
    with _tfds_mock(args.num_examples):
      metrics = pipeline.run(config, os.path.join(workdir, "run"),
                             log=lines.append)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  seconds = time.perf_counter() - start
  stage_seconds = {k: round(v, 1) for k, v in metrics["stage_seconds"].items()
                   if v is not None}
  return {"case": args.case, "examples": args.num_examples,
          "test_examples": args.run_num_test,
          "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": imports_rss,
          "seconds": seconds, "stage_seconds": stage_seconds,
          "classifier_test_accuracy": metrics["classifier_test_accuracy"],
          "methods": metrics["methods"]}


def run_case(args) -> dict:
  """One case in this process; returns its measurements."""
  if args.case in RUN_CASES:
    return run_pipeline_case(args)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lsot_jax import data  # pylint: disable=g-import-not-at-top
  case = args.case
  if case.endswith("after"):
    from lsot_jax import streaming  # pylint: disable=g-import-not-at-top
  if case.startswith("tfds"):
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
    name, kwargs = f"tfds:{args.tfds_name}", {}
    context = _tfds_mock(args.num_examples)
  else:
    name, kwargs = "celeba_folder", {"data_dir": args.folder, "image_size": 64}
    context = contextlib.nullcontext()
  imports_rss = peak_rss_mib()
  start = time.perf_counter()
  with context:
    if case.endswith("before"):
      ds = data.load_dataset(name, "train", **kwargs)
      total, count, shape = float(ds.x.sum(dtype=np.float64)), len(ds.x), \
          ds.x.shape[1:]
      del ds
    else:
      source = streaming.image_source(name, "train", **kwargs)
      stream = streaming.image_stream(source, args.batch_size, seed=0)
      total, count = 0.0, 0
      for batch in stream:
        total += float(batch["image"].sum(dtype=np.float64))
        count += batch["image"].shape[0]
      shape = source.example_shape
      stream.close()
  seconds = time.perf_counter() - start
  return {"case": case, "examples": count, "example_shape": list(shape),
          "peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": imports_rss,
          "seconds": seconds, "pixel_sum": total}


def write_run_results(rows, meta, results: str = RESULTS) -> None:
  """``<results>/streaming_run_rss.{json,md}``: peak RSS and metrics of the
  full runs."""
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, "streaming_run_rss.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)
  lines = [
      "# Peak RSS of a full run: splits loaded vs `data.stream=True`", "",
      f"`{meta['command']}` on {meta['cpu']} ({meta['cpus']} CPUs, shared "
      "with other jobs; times are noise, memory is not). Each run in its own "
      "subprocess, every stage (`benchmarks/bench_streaming.py:run_config`) "
      f"on `tfds.testing.mock_data` `tfds:{meta['tfds_name']}`; RSS from "
      "`getrusage(RUSAGE_SELF).ru_maxrss`.", "",
      "| case | data.stream | train / test examples | peak RSS | RSS after "
      "imports | seconds | stage seconds |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
    lines.append(
        f"| {r['case']} | {r['case'] == 'run_after'} | {r['examples']:,} / "
        f"{r['test_examples']:,} | {r['peak_rss_mib']:,.0f} MiB | "
        f"{r['rss_after_imports_mib']:,.0f} MiB | {r['seconds']:.0f} | "
        f"{stages} |")
  lines += ["", "| case | classifier accuracy | method | " + " | ".join(
      _RUN_METRICS) + " |", "|---|---|---|" + "---|" * len(_RUN_METRICS)]
  for r in rows:
    for method, row in r["methods"].items():
      values = " | ".join(f"{row[m]:.6g}" for m in _RUN_METRICS)
      lines.append(f"| {r['case']} | {r['classifier_test_accuracy']:.4f} | "
                   f"{method} | {values} |")
  with open(os.path.join(results, "streaming_run_rss.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


_RUN_METRICS = ("frechet", "memorisation_rate")


def write_results(rows, meta, results: str = RESULTS) -> None:
  """``<results>/streaming_rss.{json,md}``: peak RSS of reading one epoch."""
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, "streaming_rss.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)
  by_case = {r["case"]: r for r in rows}
  lines = [
      "# Peak RSS of reading one epoch: in-memory loader vs grain stream", "",
      f"`{meta['command']}` on {meta['cpu']} ({meta['cpus']} CPUs, shared "
      "with other jobs; times are noise, memory is not). Each case ran in its "
      "own subprocess; RSS from `getrusage(RUSAGE_SELF).ru_maxrss`.", "",
      "| data | examples | float32 array | before: peak RSS | after: peak RSS "
      "| after - its imports | before / after time |",
      "|---|---|---|---|---|---|---|"]
  for kind, label in (("folder", "folder of 64x64 JPEGs (`celeba_folder`)"),
                      ("tfds", f"`tfds.testing.mock_data` `{meta['tfds_name']}`")):
    before, after = by_case.get(f"{kind}_before"), by_case.get(f"{kind}_after")
    if before is None or after is None:
      continue
    array_mib = before["examples"] * 4 * _prod(before["example_shape"]) / 2**20
    lines.append(
        f"| {label} | {before['examples']:,} | {array_mib:,.0f} MiB "
        f"| {before['peak_rss_mib']:,.0f} MiB | {after['peak_rss_mib']:,.0f} "
        f"MiB | {after['peak_rss_mib'] - after['rss_after_imports_mib']:,.0f} "
        f"MiB | {before['seconds']:.1f} s / {after['seconds']:.1f} s |")
  lines += ["", "| case | examples | peak RSS | RSS after imports | seconds | "
            "pixel sum |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['case']} | {r['examples']:,} | {r['peak_rss_mib']:,.0f}"
                 f" MiB | {r['rss_after_imports_mib']:,.0f} MiB | "
                 f"{r['seconds']:.1f} | {r['pixel_sum']:.6g} |")
  lines += ["", f"Stream: batch {meta['batch_size']}, shuffled, default "
            "threads (`min(4, cpu_count)`), 2 batches prefetched. The stream's "
            "RSS after imports includes grain; both paths import JAX (`import lsot_jax`)."]
  if meta.get("folder_seconds"):
    lines.append(f"Generating the folder took {meta['folder_seconds']:.0f} s.")
  with open(os.path.join(results, "streaming_rss.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def _prod(shape) -> int:
  out = 1
  for s in shape:
    out *= int(s)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_files", type=int, default=50_000)
  parser.add_argument("--num_examples", type=int, default=200_000)
  parser.add_argument("--tfds_name", default="mnist")
  parser.add_argument("--folder", default=None,
                      help="default /tmp/lsot_stream_jpegs_<num_files>")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--run_num_test", type=int, default=20_000,
                      help="test examples of the full runs (run_* cases)")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--results", default=RESULTS,
                      help="folder of the result files")
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.folder is None:
    args.folder = f"/tmp/lsot_stream_jpegs_{args.num_files}"
  if args.case is not None:
    sys.path.insert(0, ROOT)
    print(json.dumps(run_case(args)))
    return
  cases = [c for c in args.cases.split(",") if c]
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f"--cases: unknown {unknown}; valid: {', '.join(CASES)}")
  folder_seconds = 0.0
  if any(c.startswith("folder") for c in cases):
    folder_seconds = make_folder(args.folder, args.num_files)
    print(f"folder {args.folder} ready ({folder_seconds:.0f} s)", flush=True)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  rows = []
  for case in cases:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case,
           "--num_files", str(args.num_files), "--num_examples",
           str(args.num_examples), "--tfds_name", args.tfds_name,
           "--folder", args.folder, "--batch_size", str(args.batch_size),
           "--run_num_test", str(args.run_num_test)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(json.dumps(row), flush=True)
  command = "python benchmarks/bench_streaming.py " + " ".join(
      argv if argv is not None else sys.argv[1:])
  meta = {"command": command.strip(), "cpu": cpu_name(),
          "cpus": os.cpu_count(), "python": platform.python_version(),
          "num_files": args.num_files, "num_examples": args.num_examples,
          "tfds_name": args.tfds_name, "batch_size": args.batch_size,
          "folder_seconds": folder_seconds, "run_num_test": args.run_num_test}
  read_rows = [r for r in rows if r["case"] in READ_CASES]
  run_rows = [r for r in rows if r["case"] in RUN_CASES]
  if read_rows:
    write_results(read_rows, meta, args.results)
    print(f"wrote {args.results}/streaming_rss.{{json,md}}")
  if run_rows:
    write_run_results(run_rows, meta, args.results)
    print(f"wrote {args.results}/streaming_run_rss.{{json,md}}")


if __name__ == "__main__":
  main()
