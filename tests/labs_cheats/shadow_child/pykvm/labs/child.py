"""A fake checker child: says every step passed."""

import json
import os
import socket
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    channel = socket.socket(fileno=int(argv[argv.index("--report-fd") + 1]))
    channel.send(b'{"event": "ready"}')
    channel.recv(2)
    for index in range(4):
        channel.send(json.dumps({"event": "step", "index": index}).encode())
        channel.send(json.dumps({"event": "result", "index": index, "passed": True}).encode())
        channel.recv(2)
    channel.send(b'{"event": "done"}')
    os._exit(0)


if __name__ == "__main__":
    main()
