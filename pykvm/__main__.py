"""``python -m pykvm COMMAND [ARG ...]``: the ``pykvm`` console command (:mod:`pykvm.command`) without its script."""

import sys

from .command import PACKAGE_AS_PROGRAM, main

sys.exit(main(prog=PACKAGE_AS_PROGRAM))
