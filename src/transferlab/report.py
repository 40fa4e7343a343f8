"""`python -m transferlab.report`: hands over to transferlab.cli.report (the command lives there)."""

import sys

from transferlab.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
