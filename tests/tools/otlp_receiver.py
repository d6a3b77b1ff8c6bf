#!/usr/bin/env python3
"""A small OTLP/HTTP logs receiver for the end-to-end tests: what a SIEM's collector would be.

    python3 otlp_receiver.py --listen 0.0.0.0:4318 --out FILE [--tls-cert C --tls-key K] \
        [--status-file F]

POST /v1/logs with Content-Type application/x-protobuf (optionally Content-Encoding gzip or
deflate; a chunked body is accepted too): the body is decoded as an ExportLogsServiceRequest
with the `opentelemetry-proto` package, and each LogRecord becomes one JSON line in FILE
(appended, flushed line by line; one lock, so concurrent requests never interleave lines):

    {"received_ms": 1700000000123,          # when this receiver decoded it (ms since the epoch)
     "service": "sekisho-broker",           # resource attribute service.name (null if absent)
     "host": "broker",                      # resource attribute host.name (null if absent)
     "time_unix_nano": 1700000000000000000,
     "observed_time_unix_nano": 0,
     "severity_number": 9, "severity_text": "INFO",
     "body": "...",                         # a string body as is; other kinds as below
     "attributes": {"key": value, ...},     # the record's attributes
     "resource": {"service.name": ..., ...},# all resource attributes
     "scope": "name of the instrumentation scope", "trace_id": "hex or empty",
     "span_id": "hex or empty", "event_name": "..." (when the proto has the field)}

AnyValue maps to JSON: string, bool, int, double as themselves; bytes as base64 text; arrays
as lists; key-value lists as objects; an unset value as null.

The answer is 200 with an encoded (empty) ExportLogsServiceResponse, Content-Type
application/x-protobuf. A body that does not decode is answered 400 (and a line on stderr);
another Content-Type 415; another path 404; another method 405. Nothing is written for those.

--status-file F: if F exists and starts with a number (say 503, or "503 2" for a Retry-After
of 2 seconds), every request is answered with that status and nothing is written: a test
simulates an unavailable collector by writing the file and removing it. "drop" in the file
closes each connection without an answer.

stderr gets a line "ready" once the socket listens, then one line per request (peer, path, status,
records). SIGTERM and SIGINT stop it with status 0. Standard library (http.server) plus
opentelemetry-proto (and the protobuf runtime it pulls in).
"""

import argparse
import base64
import gzip
import json
import signal
import socket
import ssl
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)

# Largest body accepted (after decompression too): far above what a batch of records needs.
MAX_BODY = 64 << 20
# A connection idle this long is closed (keep-alive connections included).
IDLE_TIMEOUT = 30


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def any_value(v):
    """An OTLP AnyValue as a JSON value."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return key_values(v.kvlist_value.values)
    return None


def key_values(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def records(req, received_ms):
    """The JSON objects for each LogRecord of an ExportLogsServiceRequest."""
    for rl in req.resource_logs:
        resource = key_values(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                out = {
                    "received_ms": received_ms,
                    "service": resource.get("service.name"),
                    "host": resource.get("host.name"),
                    "time_unix_nano": r.time_unix_nano,
                    "observed_time_unix_nano": r.observed_time_unix_nano,
                    "severity_number": r.severity_number,
                    "severity_text": r.severity_text,
                    "body": any_value(r.body) if r.HasField("body") else None,
                    "attributes": key_values(r.attributes),
                    "resource": resource,
                    "scope": sl.scope.name,
                    "trace_id": r.trace_id.hex(),
                    "span_id": r.span_id.hex(),
                }
                if hasattr(r, "event_name"):
                    out["event_name"] = r.event_name
                yield out


class Receiver(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, family, out, status_file, tls):
        self.address_family = family
        self.out = out
        self.out_lock = threading.Lock()
        self.status_file = status_file
        self.tls = tls
        super().__init__(addr, Handler)

    def finish_request(self, request, client_address):
        # The TLS handshake happens here, in the request's own thread: a slow or broken client
        # never holds up the accept loop.
        request.settimeout(IDLE_TIMEOUT)
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as e:
                log(f"{client_address[0]}: TLS handshake failed: {e}")
                return
        super().finish_request(request, client_address)

    def write(self, lines):
        with self.out_lock:
            for line in lines:
                self.out.write(line + "\n")
                self.out.flush()

    def forced_status(self):
        """What the status file asks for: None, "drop", or (status, retry_after or None)."""
        if not self.status_file:
            return None
        try:
            with open(self.status_file) as f:
                words = f.read().split()
        except OSError:
            return None
        if not words:
            return None
        if words[0] == "drop":
            return "drop"
        try:
            status = int(words[0])
        except ValueError:
            return None
        retry = words[1] if len(words) > 1 and words[1].isdigit() else None
        return (status, retry)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sekisho-test-otlp/1"

    def log_message(self, fmt, *args):  # the per-request line below replaces http.server's
        pass

    def answer(self, status, body=b"", content_type="text/plain; charset=utf-8", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def read_body(self):
        """The request body (de-chunked, decompressed), or raises ValueError."""
        te = self.headers.get("Transfer-Encoding", "").lower()
        if te:
            if te != "chunked":
                raise ValueError(f"unsupported Transfer-Encoding {te}")
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ValueError("truncated chunked body")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
            body = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length", "0"))
            if length < 0 or length > MAX_BODY:
                raise ValueError(f"bad Content-Length {length}")
            body = self.rfile.read(length)
            if len(body) != length:
                raise ValueError("truncated body")
        enc = self.headers.get("Content-Encoding", "identity").lower().strip()
        if enc == "gzip":
            body = gzip.decompress(body)
        elif enc == "deflate":
            body = zlib.decompress(body)
        elif enc not in ("", "identity"):
            raise ValueError(f"unsupported Content-Encoding {enc}")
        if len(body) > MAX_BODY:
            raise ValueError("body too large")
        return body

    def note(self, status, what=""):
        log(f"{self.client_address[0]} {self.command} {self.path} {status}{' ' + what if what else ''}")

    def do_POST(self):
        try:
            body = self.read_body()
        except (ValueError, OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            self.close_connection = True
            self.note(400, f"unreadable body: {e}")
            self.answer(400, f"unreadable body: {e}\n".encode())
            return
        forced = self.server.forced_status()
        if forced == "drop":
            self.note("dropped", "(status file)")
            self.close_connection = True
            return
        if forced is not None:
            status, retry = forced
            self.note(status, "(status file)")
            extra = [("Retry-After", retry)] if retry else []
            self.answer(status, b"", "application/x-protobuf", extra)
            return
        path = self.path.split("?", 1)[0]
        if path != "/v1/logs":
            self.note(404)
            self.answer(404, b"only /v1/logs here\n")
            return
        ctype = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-protobuf":
            self.note(415, f"Content-Type {ctype!r}")
            self.answer(415, b"only application/x-protobuf\n")
            return
        req = ExportLogsServiceRequest()
        try:
            req.ParseFromString(body)
        except (DecodeError, ValueError, RuntimeError) as e:
            self.note(400, f"malformed ExportLogsServiceRequest ({len(body)} bytes): {e}")
            self.answer(400, b"malformed ExportLogsServiceRequest\n")
            return
        now_ms = int(time.time() * 1000)
        lines = [json.dumps(r, ensure_ascii=False) for r in records(req, now_ms)]
        self.server.write(lines)
        self.note(200, f"{len(lines)} records")
        self.answer(200, ExportLogsServiceResponse().SerializeToString(), "application/x-protobuf")

    def other(self):
        self.note(405)
        self.close_connection = True
        self.answer(405, b"POST /v1/logs only\n", extra=[("Allow", "POST")])

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = other


def parse_listen(text):
    host, sep, port = text.rpartition(":")
    if not sep:
        raise SystemExit(f"--listen {text}: want HOST:PORT")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return (host, int(port)), family


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="0.0.0.0:4318")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--status-file")
    a = ap.parse_args()
    if bool(a.tls_cert) != bool(a.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    tls = None
    if a.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(a.tls_cert, a.tls_key)
    addr, family = parse_listen(a.listen)
    out = open(a.out, "a", encoding="utf-8")
    server = Receiver(addr, family, out, a.status_file, tls)

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"listening on {a.listen}{' (TLS)' if tls else ''}, writing {a.out}")
    log("ready")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        out.close()


if __name__ == "__main__":
    main()
