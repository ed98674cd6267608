"""``python -m metarec``: the same command line as the ``metarec`` script."""

import sys

from metarec.cli import main

sys.exit(main())
