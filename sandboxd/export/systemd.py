"""A stack as systemd units: a .service per service, a .socket per socket, a .target for the stack.

    STACK.target            Wants= every eager service and every socket; `systemctl start STACK.target`
    STACK-SERVICE.service   the program, in the sandbox systemd_service.py writes as directives
    STACK-SOCKET.socket     ListenStream= / ListenDatagram= / ListenSequentialPacket=, Service=
    STACK-SOCKET@.service   the template a socket with `accept: true` starts once per connection
    STACK-SOCKET-proxy.service  systemd-socket-proxyd, in the service's network namespace, for `proxy:`

A socket bound in a service's network namespace (`netns: service`) gets PrivateNetwork=yes on the
.socket and JoinsNamespaceOf= it on the .service: systemd then binds it in the namespace the
service runs in, as sandboxd does. Networks (`kind: network`) have no unit form (no bridge is
made); their members get a network namespace of their own, each alone, and the export says so.

For a systemd version (default 252, Debian 12's): directives newer than it are left out, and the
keys they would carry reported: RestartSteps= and RestartMaxDelaySec= (254), PrivatePIDs= (257).
"""

from __future__ import annotations

from sandboxd.errors import SpecError, SpecErrors
from sandboxd.export.decisions import UNIT_KEY, Decision, UnitNotes, implied_socket, notes_for
from sandboxd.export.lines import key_lines
from sandboxd.export.systemd_service import VOLUMES_DIR, confinement, files, identity, life, posture, program, readiness, resources
from sandboxd.export.unitfile import UnitFile, escape_specifiers, quote_command
from sandboxd.spec.model import Address, Network, Service, Socket, Stack, Volume, socket_namespace

ENGINE = "systemd"
DEFAULT_VERSION = 252
PROXYD = "/lib/systemd/systemd-socket-proxyd"
_LISTEN = {"tcp": "ListenStream", "unix": "ListenStream", "udp": "ListenDatagram", "unix-dgram": "ListenDatagram", "unix-seqpacket": "ListenSequentialPacket"}


class Names:
    """The unit names of one stack's units (STACK-NAME, so that stacks share a host)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    @property
    def target(self) -> str:
        return f"{self.stack.name}.target"

    def socket(self, sock: Socket) -> str:
        return f"{self.stack.name}-{sock.name}.socket"

    def proxy(self, sock: Socket) -> str:
        return f"{self.stack.name}-{sock.name}-proxy.service"

    def service(self, name: str) -> str:
        """The unit of service `name`: a template named after its socket if that one accepts."""
        accepting = [s for s in self.stack.sockets_of(name) if s.accept]
        return f"{self.stack.name}-{accepting[0].name}@.service" if accepting else f"{self.stack.name}-{name}.service"


def export_systemd(stack: Stack, version: int = DEFAULT_VERSION) -> tuple[dict[str, str], list[Decision]]:
    """The unit files of `stack` (name -> text) and every decision; raises SpecErrors for a
    service systemd cannot run at all (an image that is not a folder)."""
    _refuse_images(stack)
    names = Names(stack)
    units: list[UnitFile] = []
    decisions: list[Decision] = []
    completed = {d.service for s in stack.services for d in s.after if d.condition == "completed"}
    for service in stack.services:
        notes = notes_for(ENGINE, service)
        units.append(_service_unit(stack, service, names, notes, version, service.name in completed))
        implied_socket(notes, [s.name for s in stack.sockets_of(service.name)], f"{stack.name}-{service.name}.socket")
        decisions += notes.decisions()
    for sock in stack.sockets:
        notes = notes_for(ENGINE, sock)
        units += _socket_units(stack, sock, names, notes)
        decisions += notes.decisions()
    others: list[Network | Volume] = [*stack.networks, *stack.volumes]
    for unit in others:
        notes = notes_for(ENGINE, unit)
        _other_unit(notes)
        decisions += notes.decisions()
    units.append(_target(stack, names))
    return {unit.name: unit.text() for unit in units}, decisions


def _refuse_images(stack: Stack) -> None:
    errors = [
        SpecError(s.file, key_lines(s.file, s.line).get("image", s.line), "image", f"image '{s.image}' has no systemd form: systemd runs a program from the host's root or from a folder "
                  f"(RootDirectory=); unpack the image into a folder and give its path (image: /srv/images/{s.name}), or use image: host")
        for s in stack.services if s.image != "host" and not s.image.startswith("/")
    ]  # fmt: skip
    if errors:
        raise SpecErrors(errors)


def _service_unit(stack: Stack, service: Service, names: Names, notes: UnitNotes, version: int, completes: bool) -> UnitFile:
    unit = UnitFile(names.service(service.name), f"sandboxd stack {stack.name}: service {service.name} ({service.file}:{service.line})")
    unit.add("Unit", "Description", f"{stack.name}: {service.name}")
    unit.add("Unit", "PartOf", names.target)
    for directive, value in _ordering(stack, service, names, notes):
        unit.add("Unit", directive, value)
    start_limit, life_lines = life(service, notes, version)
    for directive, value in start_limit:
        unit.add("Unit", directive, value)
    lines = [*readiness(service, notes, completes), *program(service, notes), *identity(service, notes), *posture(version)]
    lines += [*_network(stack, service, names, notes), *confinement(service, notes), *resources(service, notes)]
    lines += [*files(service, notes), *_volumes(service), *life_lines]
    for directive, value in lines:
        unit.add("Service", directive, value)
    if service.start == "eager":
        notes.mapped("start", f"Wants= of {names.target}")
    else:
        notes.mapped("start", f"{names.target} does not want it: its sockets start it")
    if service.idle_stop:
        notes.unexpressible("idle_stop", "systemd does not stop an idle service; the program must exit when idle (its socket starts it again)")
    else:
        notes.nothing("idle_stop", "not asked for")
    return unit


def _ordering(stack: Stack, service: Service, names: Names, notes: UnitNotes) -> list[tuple[str, str]]:
    """after: and uses: as [Unit] ordering; bound-in-namespace sockets as JoinsNamespaceOf=."""
    lines: list[tuple[str, str]] = []
    for dependency in service.after:
        dep = names.service(dependency.service)
        lines += [("After", dep), ("Requires", dep)]
    why = "started: Type=exec; ready: Type=notify or the check's ExecStartPost=; completed: Type=oneshot"
    notes.mapped("after", "After=, Requires=", why) if service.after else notes.nothing("after", "none given")
    for name in service.uses:
        lines += [("After", names.socket(stack.socket(name))), ("Requires", names.socket(stack.socket(name)))]
    for sock in stack.sockets:
        if socket_namespace(sock) == service.name:
            lines.append(("JoinsNamespaceOf", names.socket(sock)))
    return lines


def _network(stack: Stack, service: Service, names: Names, notes: UnitNotes) -> list[tuple[str, str]]:
    """network: and uses: in [Service]."""
    lines: list[tuple[str, str]] = []
    for name in service.uses:
        for address in stack.socket(name).listen:
            if address.path and not address.is_abstract:
                lines.append(("BindReadOnlyPaths", escape_specifiers(address.path)))
    if service.uses:
        notes.approximated("uses", "After=, Requires= of the .socket; BindReadOnlyPaths= of its file",
                           "the stack's other socket files are not hidden: the host's root shows them (read-only)")  # fmt: skip
    else:
        notes.nothing("uses", "none given")
    if service.network == "host":
        notes.mapped("network", "(no PrivateNetwork=)", "the host's network")
        return lines
    lines.append(("PrivateNetwork", "yes"))
    if service.attachments:
        notes.unexpressible("network", "a bridged network has no unit form (no systemd-networkd or nspawn units are generated): "
                            "the service gets PrivateNetwork=yes, alone, and reaches no other member")  # fmt: skip
    else:
        notes.mapped("network", "PrivateNetwork=yes", "only lo")
    return lines


def _volumes(service: Service) -> list[tuple[str, str]]:
    """The volume folders made before the start (as sandboxd makes them), owned by the service's user."""
    lines: list[tuple[str, str]] = []
    for mount in service.mounts:
        if mount.volume:
            folder = f"{VOLUMES_DIR}/{mount.volume}"
            lines.append(("ExecStartPre", "+" + quote_command(("/bin/mkdir", "-p", folder))))
            if service.user:
                owner = f"{service.user}:{service.group}" if service.group else service.user
                lines.append(("ExecStartPre", "+" + quote_command(("/bin/chown", owner, folder))))
    return lines


def listen_value(address: Address) -> str:
    """An address as ListenStream= and friends read it."""
    if address.path is not None:
        return escape_specifiers(address.path)
    host = f"[{address.host}]" if ":" in str(address.host) else address.host
    return f"{host}:{address.port}"


def _socket_units(stack: Stack, sock: Socket, names: Names, notes: UnitNotes) -> list[UnitFile]:
    unit = UnitFile(names.socket(sock), f"sandboxd stack {stack.name}: socket {sock.name} ({sock.file}:{sock.line})")
    unit.add("Unit", "Description", f"{stack.name}: socket {sock.name}")
    unit.add("Unit", "PartOf", names.target)
    for address in sock.listen:
        unit.add("Socket", _LISTEN[address.family], listen_value(address))
    notes.mapped("listen", ", ".join(sorted({f"{_LISTEN[a.family]}=" for a in sock.listen})))
    lines = [("FileDescriptorName", sock.fdname), ("Backlog", str(sock.backlog)), ("SocketMode", f"{sock.mode:04o}"),
             ("ReusePort", "yes" if sock.reuseport else "no")]  # fmt: skip
    for key, (directive, _value) in zip(("fdname", "backlog", "mode", "reuseport"), lines):
        notes.mapped(key, f"{directive}=")
    extra: list[UnitFile] = []
    if sock.accept:
        lines += [("Accept", "yes"), ("MaxConnections", str(sock.max_connections))]
        notes.mapped("accept", "Accept=yes, the template " + names.service(sock.service), "one instance per connection, each in a sandbox of its own")
        notes.mapped("max_connections", "MaxConnections=")
        notes.mapped("service", f"the template {names.service(sock.service)}")
    else:
        notes.nothing("accept", "one listening socket for the service")
        notes.nothing("max_connections", "only used with accept")
        target = names.proxy(sock) if sock.proxy else names.service(sock.service)
        lines.append(("Service", target))
        notes.mapped("service", "Service=")
    lines += _socket_namespace(stack, sock, names, notes)
    if sock.proxy is not None:
        extra.append(_proxy_unit(stack, sock, names))
        notes.mapped("proxy", f"{names.proxy(sock)} (systemd-socket-proxyd {sock.proxy})")
        notes.approximated("handoff", "", "systemd-socket-proxyd always forwards: the program never gets the socket itself")
    else:
        notes.nothing("proxy", "none given")
        notes.nothing("handoff", "only used with proxy")
    for directive, value in lines:
        unit.add("Socket", directive, value)
    return [unit, *extra]


def _socket_namespace(stack: Stack, sock: Socket, names: Names, notes: UnitNotes) -> list[tuple[str, str]]:
    owner = socket_namespace(sock)
    if owner is None:
        notes.mapped("netns", "(the host's network namespace)")
        return []
    notes.mapped("netns", f"PrivateNetwork=yes, JoinsNamespaceOf= between it and {names.service(owner)}")
    return [("PrivateNetwork", "yes")]


def _proxy_unit(stack: Stack, sock: Socket, names: Names) -> UnitFile:
    service = stack.service(sock.service)
    target = names.service(service.name)
    assert sock.proxy is not None
    unit = UnitFile(names.proxy(sock), f"sandboxd stack {stack.name}: the proxy of socket {sock.name} into {service.name}")
    for directive, value in (("Description", f"{stack.name}: proxy of {sock.name}"), ("PartOf", names.target), ("Requires", target), ("After", target)):
        unit.add("Unit", directive, value)
    if service.network != "host":
        unit.add("Unit", "JoinsNamespaceOf", target)
    unit.add("Service", "ExecStart", quote_command((PROXYD, listen_value(sock.proxy))))
    for directive, value in posture(DEFAULT_VERSION):
        unit.add("Service", directive, value)
    unit.add("Service", "PrivateNetwork", "no" if service.network == "host" else "yes")
    unit.add("Service", "DynamicUser", "yes")
    if sock.proxy.path is not None and service.image != "host":
        unit.add("Service", "RootDirectory", escape_specifiers(service.image))
    return unit


def _other_unit(notes: UnitNotes) -> None:
    if notes.kind == "volume":
        notes.mapped(UNIT_KEY, f"{VOLUMES_DIR}/{notes.unit.name}, made by each user's ExecStartPre=")
        return
    for key in ("subnet", "internal"):
        notes.unexpressible(key, "a bridged network has no unit form (no systemd-networkd or nspawn units are generated)")


def _target(stack: Stack, names: Names) -> UnitFile:
    unit = UnitFile(names.target, f"sandboxd stack {stack.name}: start it with systemctl start {names.target}")
    unit.add("Unit", "Description", f"sandboxd stack {stack.name}")
    for sock in stack.sockets:
        unit.add("Unit", "Wants", names.socket(sock))
    for service in stack.services:
        if service.start == "eager" and not any(s.accept for s in stack.sockets_of(service.name)):
            unit.add("Unit", "Wants", names.service(service.name))
    unit.add("Install", "WantedBy", "multi-user.target")
    return unit
