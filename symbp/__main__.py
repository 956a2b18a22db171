"""``python -m symbp``: the command line (see :mod:`symbp.cli`)."""

import sys

from .cli import main

sys.exit(main())
