"""Ray job entrypoint for curation — what `ray job submit` runs:

    ray job submit --address http://127.0.0.1:8265 -- \
        python jobs/curate.py --recipe manifests/sa1b.yaml --out /data/sa1b-dynaip --models models.yaml

Takes exactly the arguments of `dynaip curate`. Inside a Ray job, RAY_ADDRESS points at the
cluster, so the curation joins it; submitted again after a crash or a stop, it resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

# the code beside this file, not whatever copy is installed: `ray job submit --working-dir .` ships
# this checkout, and a job must run the same code as the `dynaip curate` it stands in for
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: Sequence[str] | None = None) -> int:
    from dynaip.cli import run_job

    return run_job("curate", None if argv is None else list(argv), "curate a dataset (Ray job entrypoint)")


if __name__ == "__main__":
    sys.exit(main())
