"""Ray Job: train one model. `python -m jobs.train --config FILE` or `--data DS --model NAME ...`."""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
