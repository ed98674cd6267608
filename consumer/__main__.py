"""``python -m consumer``: run one member of the consumer group (same as ``metarec consume``)."""

from __future__ import annotations

import sys

from metarec.cli import main

if __name__ == "__main__":
    sys.exit(main(["consume", *sys.argv[1:]]))
