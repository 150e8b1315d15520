"""``python -m pykvm.hosts tcg-amd -- COMMAND``: run a command on another KVM host."""

import sys

from .tcg_amd import main

sys.exit(main())
