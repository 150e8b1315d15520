"""``python -m pykvm.hosts (tcg-amd | bochs-intel) -- COMMAND``: run a command on another KVM host."""

import sys

from ..command import invoked_as
from .runner.cli import main

sys.exit(main(prog=invoked_as("pykvm.hosts")))
