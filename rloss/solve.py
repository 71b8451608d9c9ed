"""`python -m rloss.solve SOLVER [flags]`: the train command on its own (rloss.cli.train)."""

import sys

from rloss.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
