"""Ray Job: evaluate a model. `python -m jobs.evaluate --checkpoint CKPT --data DS --out DIR`.

A registry version instead of a folder: `--model production --registry REG`; every image of a dataset
from elsewhere: `--split all` (what `auto`, the default, picks for a dataset the model was not trained on).
"""

import sys

from cxrcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
