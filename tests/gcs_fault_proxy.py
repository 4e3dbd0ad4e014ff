"""A fault-injecting HTTP proxy in front of the GCS emulator, for storage-fault tests.

``FaultProxy(upstream)`` listens on 127.0.0.1 and forwards every request to ``upstream``
(gcp-storage-emulator), except that each `Rule` answers the first ``times`` requests that match
its method and path regex with a fault instead:

* ``status=503`` (or 429, 500, 403, ...): a JSON error response of that status, not forwarded;
* ``action="close"``: the connection is closed without an answer (a dropped connection);
* ``action="delay"``: the request is forwarded after ``delay`` seconds (a slow response);
* ``action="lost"``: the request is forwarded and done, but the answer is dropped.

gcp-storage-emulator ignores ``ifGenerationMatch``; the proxy enforces it as GCS does (HTTP 412
when the object's generation differs, 0 meaning "must not exist"), checking and forwarding under
one lock, so conditional writes can be tested. Every request is recorded (`seen`: method, path, what was done) so that tests can assert that
the client really retried. Point the client at it with ``STORAGE_EMULATOR_HOST=proxy.url``.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pipelines.chaos import answer, forward


@dataclass
class Rule:
    """Fault the first ``times`` requests whose method and path (with query) match."""

    path: str = ".*"
    method: str = ".*"
    status: int | None = None
    action: str = "status"  # status | close | delay | lost
    delay: float = 0.0
    times: int = 1
    used: int = field(default=0, init=False)

    def matches(self, method: str, path: str) -> bool:
        """True when the rule still has faults left and matches this request."""
        return (
            self.used < self.times
            and re.fullmatch(self.method, method) is not None
            and re.search(self.path, path) is not None
        )


class FaultProxy:
    """Forwarding proxy on 127.0.0.1 with scripted faults; a context manager."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None) -> None:
        self.upstream = urlsplit(upstream)
        self.rules: list[Rule] = list(rules or [])
        self.seen: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._take(self.command, self.path)
                what = "forwarded" if rule is None else (
                    f"{rule.status}" if rule.action == "status" else rule.action
                )  # fmt: skip
                with proxy._lock:
                    proxy.seen.append((self.command, self.path, what))
                if rule is not None and rule.action == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if rule is not None and rule.action == "status":
                    payload = json.dumps(
                        {"error": {"code": rule.status, "message": f"injected {rule.status}"}}
                    ).encode()
                    self.send_response(rule.status or 503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if rule is not None and rule.action == "delay":
                    time.sleep(rule.delay)
                answered = rule is None or rule.action != "lost"
                wanted = parse_qs(urlsplit(self.path).query).get("ifGenerationMatch")
                if not wanted:
                    self._forward(body, answered)
                    return
                with proxy._precondition_lock:
                    if proxy._generation(self.path, body) != int(wanted[0]):
                        with proxy._lock:
                            proxy.seen[-1] = (self.command, self.path, "412")
                        self._reply(412, b'{"error": {"code": 412, "message": "conditionNotMet"}}')
                        return
                    self._forward(body, answered)

            def _reply(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, body: bytes, answered: bool = True) -> None:
                # the client's Host: the emulator's links lead back through the proxy
                reply = forward(self, proxy.upstream, body, timeout=60, upstream_host=False)
                if reply is None:
                    return
                if not answered:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                answer(self, *reply)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients that hang up (after a timeout) are expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._precondition_lock = threading.Lock()

    def _generation(self, path: str, body: bytes) -> int:
        """The current generation of the object a request names (0 when there is none)."""
        parts = urlsplit(path)
        query = parse_qs(parts.query)
        match = re.search(r"/b/([^/]+)/o(?:/([^?]+))?", parts.path)
        if match is None:
            return -1
        bucket, name = match.group(1), unquote(match.group(2) or "")
        if not name and "name" in query:
            name = query["name"][0]
        if not name:  # multipart upload: the name is in the JSON part of the body
            found = re.search(rb'"name":\s*"([^"]+)"', body)
            name = found.group(1).decode() if found else ""
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            conn.request("GET", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}")
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        if response.status == 404:
            return 0
        return int(json.loads(payload)["generation"])

    def _take(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.used += 1
                    return rule
        return None

    def faults(self) -> list[tuple[str, str, str]]:
        """The requests that got a fault instead of a plain forward."""
        with self._lock:
            return [s for s in self.seen if s[2] != "forwarded"]

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
