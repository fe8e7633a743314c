"""Ray Job: the whole pipeline (synth or --real, check, ingest, ...). `python -m jobs.pipeline`."""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
