"""Lab 1: flood the report channel with scenario reports (each one the runner would keep)."""

import json
import socket
import sys

LAB = 1
EXPECTED_FAILURES = [(1, "invalid report: more than 64 scenarios")]

channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--report-fd") + 1]))
for number in range(100_000):
    channel.send(json.dumps({"event": "begin", "key": f"flood{number}"}).encode())


def solve(task):
    pass
