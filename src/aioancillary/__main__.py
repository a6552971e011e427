"""``python -m aioancillary``: the command line (see `aioancillary._tools._cli`)."""

from __future__ import annotations

import sys

from ._tools._cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
