"""Ray Job: side-by-side benchmarks. `python -m jobs.benchmark ingest --images 2000`."""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
