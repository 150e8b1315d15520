"""Lab 1: a result for a step the lab does not have."""

import json
import socket
import sys

LAB = 1
EXPECTED_FAILURES = [(1, "invalid report: a result for step 99")]

channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--report-fd") + 1]))
channel.send(json.dumps({"event": "result", "index": 99, "passed": True}).encode())


def solve(task):
    pass
