"""``python -m moewatch``: the ``moewatch`` command."""

import sys

from moewatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
