"""The back end: a tiny HTTP service on the unix socket sandboxd passed in as fd 3."""

import http.server
import json
import os
import signal
import socket
import socketserver

from activation import listen_sockets

requests = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def address_string(self) -> str:
        return "unix"

    def do_GET(self) -> None:
        global requests
        requests += 1
        body = json.dumps(
            {"greeting": os.environ.get("GREETING", "hello"), "hostname": socket.gethostname(), "pid": os.getpid(), "requests": requests}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def reload(*_: object) -> None:
    """`sandboxd reload backend` sends SIGHUP: read the greeting again (here: note the reload)."""
    print("reloaded", flush=True)


signal.signal(signal.SIGHUP, reload)
server = Server("", Handler, bind_and_activate=False)
server.socket = listen_sockets()["backend"]
print(f"back end ready as pid {os.getpid()} on host {socket.gethostname()}")
server.serve_forever()
