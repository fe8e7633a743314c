"""Ray Job: evaluate a checkpoint. `python -m jobs.evaluate --checkpoint CKPT --data DS --out DIR`."""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
