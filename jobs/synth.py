"""Ray job entrypoint for diptych generation — what `ray job submit` runs:

    ray job submit --address http://127.0.0.1:8265 -- \
        python jobs/synth.py manifests/synth.yaml --out /data/synth-dynaip --models models.yaml

Takes exactly the arguments of `dynaip synth`. Inside a Ray job, RAY_ADDRESS points at the cluster; the
chunk workers (one GPU each, `executor.gpus_per_actor`) generate, curate and write whole chunks.
Submitted again after a crash or a stop, it skips finished chunks and writes identical bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

# the code beside this file, not an installed copy (as jobs/curate.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: Sequence[str] | None = None) -> int:
    from dynaip.cli import run_job

    return run_job("synth", None if argv is None else list(argv), "generate diptych pairs (Ray job entrypoint)")


if __name__ == "__main__":
    sys.exit(main())
