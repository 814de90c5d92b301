"""Ray job entrypoint for diptych generation — what `ray job submit` runs:

    ray job submit --address http://127.0.0.1:8265 -- \
        python jobs/synth.py manifests/synth.yaml --out /data/synth-dynaip --models models.yaml

Takes exactly the arguments of `dynaip synth`. Inside a Ray job, RAY_ADDRESS points at the cluster; the
chunk workers (one GPU each, `executor.gpus_per_actor`) generate, curate and write whole chunks.
Submitted again after a crash or a stop, it skips finished chunks and writes identical bytes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

# the code beside this file, not an installed copy (as jobs/curate.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.cli import add_synth_parser

    parser = argparse.ArgumentParser(prog="jobs/synth.py", description="generate diptych pairs (Ray job entrypoint)")
    sub = parser.add_subparsers(dest="command")
    add_synth_parser(sub)
    args = parser.parse_args(["synth", *(sys.argv[1:] if argv is None else argv)])
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
