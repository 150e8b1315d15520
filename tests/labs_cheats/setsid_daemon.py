"""Lab 1: leave a daemon (setsid, double fork) spinning with the VM's fds; it leaves daemon.started when it runs."""

import os
from pathlib import Path

import pykvm

LAB = 1
EXPECTED_FAILURES = [(1, "solve() returned without creating a vCPU")]
STARTED = Path(__file__).with_name("daemon.started")


def solve(task):
    kvm = pykvm.Kvm()
    kvm.create_vm()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            STARTED.touch()
            while True:
                pass
        os._exit(0)
    os.wait()
    while not STARTED.exists():
        pass
