r"""Publishes a finished run's figures as committed files that the README quotes (lsot_jax.publish).

Usage:
  python benchmarks/publish_run.py --workdir /tmp/digits8 --name digits --config digits --commit b13b6e4 \
      --update_docs
  python benchmarks/publish_run.py --workdir runs/mnist --name mnist --config mnist --update_docs

writes docs/results/NAME/{metrics.json,run.json,table.md} and docs/img/NAME_extended.png /
NAME_extended_nn.png (where the run has those grids); --update_docs also replaces the table quoted after the
line naming docs/results/NAME/table.md in README.md and in the docstring of configs/<config>.py (indented by
two spaces). tests/test_publish.py checks those quotes against the committed files.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lsot_jax import publish  # pylint: disable=wrong-import-position


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a run folder whose eval stage is finished")
  parser.add_argument("--name", required=True, help="published name, e.g. mnist or digits")
  parser.add_argument("--config", default=None,
                      help="the run's --config value (e.g. mnist, configs/digits.py): run.json then lists the "
                           "fields the run overrode")
  parser.add_argument("--commit", default=None,
                      help="the commit the run was made at, if not the one checked out now (recorded in run.json)")
  parser.add_argument("--root", default=ROOT,
                      help="the checkout to write into: ROOT/docs/, ROOT/README.md, ROOT/configs/ (this one)")
  parser.add_argument("--update_docs", action="store_true",
                      help="replace the quoted table in README.md and in configs/<config>.py's docstring")
  args = parser.parse_args(argv)
  update = {}
  if args.update_docs:
    update[os.path.join(args.root, "README.md")] = ""
    if args.config is not None:
      stem = os.path.splitext(os.path.basename(args.config.split(":")[0]))[0]
      config_file = os.path.join(args.root, "configs", f"{stem}.py")
      if os.path.isfile(config_file):
        update[config_file] = "  "
  try:
    written = publish.publish_run(args.workdir, args.name, docs_dir=os.path.join(args.root, "docs"),
                                  config=args.config, commit=args.commit, update=update)
  except (ValueError, OSError) as e:
    print(f"publish_run: error: {e}", file=sys.stderr)
    return 1
  for path in written:
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
