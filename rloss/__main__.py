"""`python -m rloss ...`: see rloss.cli.main."""

import sys

from rloss.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
