"""`python -m flux2_accel.optim.cli`: the `flux2-accel` command."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
