"""Lab 1 without KVM: write "passed" results for every step to the report channel named in sys.argv."""

import json
import os
import socket
import sys

LAB = 1
EXPECTED_FAILURES = [(1, "no vCPU of this check ever ran")]

channel = socket.socket(fileno=int(sys.argv[sys.argv.index("--report-fd") + 1]))
for index in range(4):
    channel.send(json.dumps({"event": "result", "index": index, "passed": True, "detail": "forged"}).encode())
channel.send(json.dumps({"event": "done"}).encode())
os._exit(0)
