"""Ray job entrypoint for curation — what `ray job submit` runs:

    ray job submit --address http://127.0.0.1:8265 -- \
        python jobs/curate.py --recipe manifests/sa1b.yaml --out /data/sa1b-dynaip --models models.yaml

Takes exactly the arguments of `dynaip curate`. Inside a Ray job, RAY_ADDRESS points at the
cluster, so the curation joins it; submitted again after a crash or a stop, it resumes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

# the code beside this file, not whatever copy is installed: `ray job submit --working-dir .` ships
# this checkout, and a job must run the same code as the `dynaip curate` it stands in for
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.cli import add_curate_parser

    parser = argparse.ArgumentParser(prog="jobs/curate.py", description="curate a dataset (Ray job entrypoint)")
    sub = parser.add_subparsers(dest="command")
    add_curate_parser(sub)
    args = parser.parse_args(["curate", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dynaip.cli import user_message
    from pipeline.stages.common import SetupError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, SetupError) as e:  # user errors: one line in the job log, no traceback
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
