#!/usr/bin/python3
"""A webhook receiver for the integration tests (tests/it/webhooks.rs).

Records every request on arrival, before answering, as one JSON line in
--out: {"path", "headers" (lower-cased names), "body"}. Then:
  - requests whose path is in --hang are never answered (the connection
    stays open until the process ends);
  - the first requests sleep --delays seconds each (e.g. "3,1,1") before
    answering, to play a slow receiver;
  - the first requests are answered with --statuses (e.g. "503,400"), the
    rest with 200.
HTTP/1.1 with keep-alive; one thread per connection, so a hung or slow
connection does not hold up the others.
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = None
lock = threading.Lock()
delays = []
statuses = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without this, Nagle and
    # the client's delayed ACK add ~40 ms to every response
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        rec = {
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8"),
        }
        with lock:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            delay = delays.pop(0) if delays else 0.0
            status = statuses.pop(0) if statuses else 200
        if self.path in args.hang:
            time.sleep(3600)
            return
        time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--delays", default="")
    p.add_argument("--hang", action="append", default=[])
    p.add_argument("--statuses", default="")
    args = p.parse_args()
    delays.extend(float(d) for d in args.delays.split(",") if d)
    statuses.extend(int(s) for s in args.statuses.split(",") if s)
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
