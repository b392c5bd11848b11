"""`python -m dpsgs ...`: see dpsgs.cli for the commands and their exact command lines."""

import sys

from dpsgs.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
