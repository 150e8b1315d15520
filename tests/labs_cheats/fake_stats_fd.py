"""Lab 1: hand the checker a memfd dressed as KVM's vCPU statistics, with every result passed."""

import json
import os
import socket
import sys

LAB = 1
EXPECTED_FAILURES = [(1, "not a vCPU stats fd made by KVM")]

channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--report-fd") + 1]))


def solve(task):
    fake = os.memfd_create("kvm-vcpu-stats:0")
    os.write(fake, b"\0" * 4096)
    socket.send_fds(channel, [json.dumps({"event": "vcpu", "key": "solve"}).encode()], [fake])
