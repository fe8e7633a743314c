"""Ray Job: compare architectures with Ray Tune. `python -m jobs.tune --config FILE`."""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
