#!/usr/bin/env python3
"""api: a small JSON HTTP service, the payload of recipes/fargate-api.yaml.

Standard library only, so the image needs nothing but python3. Endpoints:

    GET /healthz   {"status": "ok"}                      (load balancer and container health)
    GET /version   {"service": "api", "build": "..."}    (which image is running)

Settings come from the environment: PORT (default 8080), LOG_LEVEL (default info) and
API_BUILD (the image's build, set by the image). Logs are JSON lines on stdout.

    app.py                serve until SIGTERM or SIGINT
    app.py --check        self-test without the network: prints "ok" and exits 0
    app.py --healthcheck  GET /healthz on this container; exits 0 when healthy (ECS health check)
"""

import json
import logging
import os
import signal
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = logging.getLogger("api")


def port() -> int:
    return int(os.environ.get("PORT", "8080"))


def respond(method: str, path: str) -> tuple[int, dict]:
    """The status and JSON body for a request; no I/O, so --check can test it."""
    if method != "GET":
        return 405, {"error": "method not allowed"}
    if path == "/healthz":
        return 200, {"status": "ok"}
    if path == "/version":
        return 200, {"service": "api", "build": os.environ.get("API_BUILD", "unknown")}
    return 404, {"error": "not found"}


class Handler(BaseHTTPRequestHandler):
    server_version = "api"
    sys_version = ""

    def handle_any(self) -> None:
        status, body = respond(self.command, self.path.split("?", 1)[0])
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = handle_any
    do_POST = handle_any
    do_PUT = handle_any
    do_DELETE = handle_any

    def log_message(self, format: str, *args) -> None:
        LOG.info(format % args, extra={"client": self.client_address[0]})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname.lower(), "message": record.getMessage()}
        if hasattr(record, "client"):
            line["client"] = record.client
        return json.dumps(line)


def check() -> int:
    assert respond("GET", "/healthz") == (200, {"status": "ok"})
    assert respond("GET", "/nope")[0] == 404
    assert respond("POST", "/healthz")[0] == 405
    print("ok")
    return 0


def healthcheck() -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port()}/healthz", timeout=2) as r:
            return 0 if r.status == 200 else 1
    except OSError:
        return 1


def serve() -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "info").upper(), handlers=[handler])
    # ECS stops a task with SIGTERM, then SIGKILL after the stop timeout.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = ThreadingHTTPServer(("0.0.0.0", port()), Handler)
    server.daemon_threads = True
    LOG.info("listening on port %d", port())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        LOG.info("stopped")
    return 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        return check()
    if argv[1:] == ["--healthcheck"]:
        return healthcheck()
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
