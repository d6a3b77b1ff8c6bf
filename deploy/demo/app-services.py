#!/usr/bin/env python3
"""The quickstart's private application host: HTTP on 80 (serving a folder), a TCP listener on
5432 standing in for a database, a UDP echo service on 7, and a TCP listener with a long
backlog on 9000 for load tests. Standard library only."""
import http.server, socket, socketserver, sys, threading, functools

root = sys.argv[1] if len(sys.argv) > 1 else "."

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("http %s %s\n" % (self.client_address[0], fmt % args))

class HTTP(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

def tcp_db():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 5432)); s.listen(16)
    while True:
        c, a = s.accept()
        try: c.sendall(b"pretend-database ready\n")
        finally: c.close()

def udp_echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 7))
    while True:
        data, addr = s.recvfrom(65535)
        s.sendto(data, addr)

def tcp_load():
    # Load tests open many flows here: a long backlog; connections are closed at once.
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 9000)); s.listen(4096)
    while True:
        c, a = s.accept()
        c.close()

threading.Thread(target=tcp_db, daemon=True).start()
threading.Thread(target=tcp_load, daemon=True).start()
threading.Thread(target=udp_echo, daemon=True).start()
HTTP(("0.0.0.0", 80), functools.partial(Handler, directory=root)).serve_forever()
