"""Ray Job: each stage beside its plain baseline, into OUT/benchmark.{json,md}.

`python -m jobs.benchmark [ingest|train|serve|gpu|all] --out DIR [--quick]`
"""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
