"""`python -m cxrcore` is the `cxr` console script."""

import sys

from cxrcore.cli import main

sys.exit(main())
