"""Ray Job: ingest a raw dataset into Parquet. `python -m jobs.ingest RAW OUT` or `--config FILE`."""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "ingest", *sys.argv[1:]]))
