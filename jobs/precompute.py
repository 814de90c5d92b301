"""Ray job entrypoint for feature precomputation — what `ray job submit` runs:

    ray job submit --address http://127.0.0.1:8265 -- \
        python jobs/precompute.py --data /data/ffhq-dynaip --data /data/sa1b-dynaip \
            --models models.yaml --config jobs/configs/paper.yaml

Takes exactly the arguments of `dynaip precompute`. Inside a Ray job, RAY_ADDRESS points at the
cluster, so the encoder actors run there (one per GPU by default) and each writes its own feature
shards next to the dataset (a filesystem every node can write); the driver writes the manifests.
Submitted again after a crash or a stop, it resumes: finished shards are kept.
"""

from __future__ import annotations

import sys

from dynaip.features.cli import main

if __name__ == "__main__":
    sys.exit(main())
