"""The front end: HTTP on the socket sandboxd bound on 127.0.0.1:8080; asks the back end over unix."""

import http.client
import http.server
import json
import os
import socket

from activation import listen_sockets

BACKEND = "/run/sbd-example/backend.sock"


class UnixHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)  # the back end may be restarting: wait for it, but not forever
        self.sock.connect(BACKEND)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        conn = UnixHTTPConnection("backend")
        conn.request("GET", "/")
        backend = json.loads(conn.getresponse().read())
        body = (
            json.dumps({"web": {"hostname": socket.gethostname(), "pid": os.getpid()}, "backend": backend}, indent=2) + "\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket = listen_sockets()["web"]
print(f"web ready as pid {os.getpid()}, listening on {server.socket.getsockname()}")
server.serve_forever()
