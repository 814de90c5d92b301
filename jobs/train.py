"""Entry point for `ray job submit -- python jobs/train.py --config ... --data ... --out ...`.

Takes exactly the arguments of `dynaip train`. Inside a Ray job, pass `--ray-address auto` to
train on the cluster that runs the job (otherwise an embedded local Ray is started).
"""

import sys

from dynaip.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
