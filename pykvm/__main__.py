"""``python -m pykvm COMMAND [ARG ...]``: the ``pykvm`` console command (:mod:`pykvm.command`) without its script."""

import sys

from .command import main

sys.exit(main())
