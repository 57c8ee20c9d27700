"""The socket unit a service's `listen:` implies: the one-file service with a port.

    kind: service             # is read as this service, and beside it as
    name: web                 #
    command: [python3, app.py]#     kind: socket
    listen: tcp:0.0.0.0:8080  #     name: web          (the service's name)
                              #     service: web       fdname: web
                              #     listen: tcp:0.0.0.0:8080, every other key at its default

The implied socket is a unit like any other from then on (Stack.sockets, with `implied` set): its
checks (address clashes, `uses:`), `config`, `ps`, the Stack API and the export to other engines
see it as one. Its problems name the service's file and the line of its `listen:`. An explicit
socket unit of the same name is an error (checks.py says which to remove); for any option
besides the address, write the socket unit instead.
"""

from __future__ import annotations

import socket

from sandboxd.spec.checks import Found
from sandboxd.spec.model import Service, Socket

# The defaults of keys.py's socket table, for every key `listen:` on a service does not set.
_BACKLOG, _MODE, _MAX_CONNECTIONS = socket.SOMAXCONN, 0o666, 64


def implied_socket(service: Service, line: int) -> Socket:
    """The socket unit of `service`'s `listen:` (written at `line`), fed to the service."""
    return Socket(
        name=service.name,
        file=service.file,
        line=line,
        service=service.name,
        listen=service.listen,
        fdname=service.name,
        backlog=_BACKLOG,
        mode=_MODE,
        reuseport=False,
        netns="host",
        accept=False,
        max_connections=_MAX_CONNECTIONS,
        proxy=None,
        handoff=None,
        implied=True,
    )


def implied_found(service: Service, lines: dict[str, int]) -> Found:
    """The implied socket as the checks between units see a unit: its keys at the lines of the
    service's `listen:` (and of its items)."""
    line = lines.get("listen", lines[""])
    own = {key: value for key, value in lines.items() if key == "listen" or key.startswith("listen[")}
    return Found("socket", service.name, service.file, {"": line, "name": line, **own}, implied_socket(service, line))
