"""``python -m pykvm.hosts tcg-amd -- COMMAND``: run a command on another KVM host."""

import sys

from .runner.cli import main

sys.exit(main())
