#!/usr/bin/env python3
"""A loopback HTTP proxy in front of moto for scripts/bench-upload.

moto answers StartSnapshot with `BlockSize: 512`; AWS answers 524288 (512 KiB), the only block
size the EBS direct APIs use. coldsnap sizes its blocks from that answer, so against bare moto it
would send a thousand times more requests than against AWS and the benchmark would measure the
emulator. This proxy passes every request through unchanged and rewrites only the BlockSize of
StartSnapshot answers (`POST /snapshots`) to AWS's value, so both tools upload the same 512 KiB
blocks, as they would to AWS.

Usage: ebs-block-size-proxy.py UPSTREAM_URL PORT_FILE
Listens on 127.0.0.1 on a free port, writes the port to PORT_FILE, serves until killed.
"""

import http.client
import http.server
import json
import os
import sys
import urllib.parse

AWS_BLOCK_SIZE = 524288
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def main() -> None:
    upstream = urllib.parse.urlsplit(sys.argv[1])
    if upstream.hostname not in ("127.0.0.1", "localhost"):
        sys.exit(f"upstream must be on loopback, not {upstream.hostname}")
    port_file = sys.argv[2]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def relay(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=300)
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            connection.close()
            if self.command == "POST" and self.path.split("?")[0].rstrip("/") == "/snapshots":
                try:
                    answer = json.loads(data)
                    if answer.get("BlockSize") == 512:
                        answer["BlockSize"] = AWS_BLOCK_SIZE
                        data = json.dumps(answer).encode()
                except ValueError:
                    pass
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = relay

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
