"""A service's sandbox as systemd.exec(5) and systemd.resource-control(5) directives.

What sandboxd does to every sandbox, systemd does per unit with one directive each; the ones
below stand for the namespaces and mounts sandboxd always makes (not for a key):

    own mount namespace, host root read-only   ProtectSystem=strict, ProtectHome=yes
    own /dev, ipc and uts namespaces           PrivateDevices=yes, PrivateIPC=yes, ProtectHostname=yes
    kernel knobs out of reach                  ProtectKernelTunables=, ProtectKernelModules=,
                                               ProtectKernelLogs=, ProtectControlGroups=, ProtectClock=
    own pid namespace                          PrivatePIDs=yes from systemd 257; before it,
                                               ProtectProc=invisible (other users' processes hidden)

Each key of the spec is decided in `service_directives`, which returns the [Unit] and [Service]
lines and notes every decision on the unit's record.
"""

from __future__ import annotations

import math
import shlex
import signal

from sandboxd.export.decisions import UnitNotes
from sandboxd.export.seccomp import systemd_directives
from sandboxd.export.unitfile import escape_specifiers, quote_assignment, quote_command, seconds
from sandboxd.spec.model import Service

VOLUMES_DIR = "/var/lib/sandboxd/volumes"  # sandboxd's own: a host moved to systemd keeps its data
SHELL = "/bin/sh"
Lines = list[tuple[str, str]]


def posture(version: int) -> Lines:
    """The directives for what every sandbox is, whatever its keys say."""
    lines: Lines = [
        ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateDevices", "yes"), ("PrivateIPC", "yes"),
        ("ProtectHostname", "yes"), ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"), ("ProtectControlGroups", "yes"), ("ProtectClock", "yes"),
    ]  # fmt: skip
    lines.append(("PrivatePIDs", "yes") if version >= 257 else ("ProtectProc", "invisible"))
    return lines


def identity(service: Service, notes: UnitNotes) -> Lines:
    """user, group, userns: who the program runs as."""
    lines: Lines = []
    if service.user:
        lines.append(("User", service.user))
        notes.mapped("user", "User=")
    else:
        notes.nothing("user", "root (or, with userns, the dynamic user below)")
    if service.group:
        lines.append(("Group", service.group))
        notes.mapped("group", "Group=")
    else:
        notes.nothing("group", "the user's group")
    if service.userns:
        lines.append(("PrivateUsers", "yes"))
        if not service.user:
            lines.append(("DynamicUser", "yes"))
            notes.approximated("userns", "PrivateUsers=yes, DynamicUser=yes",
                               "root of a user namespace becomes a dynamic unprivileged user: files it writes belong to that user, "
                               "and a volume's folder is root's (give user: to have it chowned)")  # fmt: skip
        else:
            notes.approximated("userns", "PrivateUsers=yes", "systemd maps only the unit's user and root; every other id is nobody")
    else:
        notes.mapped("userns", "(no PrivateUsers=)", "the host's ids")
    return lines


def confinement(service: Service, notes: UnitNotes) -> Lines:
    """capabilities, no_new_privs, seccomp."""
    caps = " ".join(f"CAP_{name}" for name in service.capabilities)
    lines: Lines = [("CapabilityBoundingSet", caps)]
    if caps:
        lines.append(("AmbientCapabilities", caps))
    notes.mapped("capabilities", "CapabilityBoundingSet=, AmbientCapabilities=", "every other capability dropped")
    lines.append(("NoNewPrivileges", "yes" if service.no_new_privs else "no"))
    notes.mapped("no_new_privs", "NoNewPrivileges=")
    filters = systemd_directives(service)
    lines += filters
    if filters:
        notes.mapped("seccomp", ", ".join(sorted({f"{d}=" for d, _ in filters})), "sandboxd's deny list, less the calls allowed")
    else:
        notes.mapped("seccomp", "(no SystemCallFilter=)", "unconfined")
    return lines


def resources(service: Service, notes: UnitNotes) -> Lines:
    """limits (one decision per limit), limits_optional."""
    limits = service.limits.with_defaults()
    directives = {"memory": "MemoryMax", "memory_high": "MemoryHigh", "swap": "MemorySwapMax", "pids": "TasksMax",
                  "cpu": "CPUQuota", "cpu_weight": "CPUWeight", "io_weight": "IOWeight"}  # fmt: skip
    lines: Lines = []
    for name, directive in directives.items():
        value = getattr(limits, name)
        if value is None:
            continue
        lines.append((directive, f"{math.ceil(value * 100)}%" if name == "cpu" else str(value)))
        notes.mapped(f"limits.{name}", f"{directive}=")
    notes.mapped("limits", ", ".join(f"{d}=" for d, _ in lines))
    notes.nothing("limits_optional", "systemd leaves out a limit whose controller the host lacks, as limits_optional does")
    return lines


def program(service: Service, notes: UnitNotes) -> Lines:
    """command, environment, env_file, workdir, hostname, image."""
    if not service.command:
        raise AssertionError("a service without a command has an image: systemd.py refuses it first")
    lines: Lines = [("ExecStart", quote_command(service.command))]
    notes.mapped("command", "ExecStart=")
    lines += [("Environment", quote_assignment(key, value)) for key, value in service.environment]
    notes.mapped("environment", "Environment=") if service.environment else notes.nothing("environment", "none given")
    if service.env_file:
        notes.mapped("env_file", "Environment=", "read at export time, as sandboxd reads it at load time")
    else:
        notes.nothing("env_file", "none given")
    lines.append(("WorkingDirectory", escape_specifiers(service.workdir or "/")))
    notes.mapped("workdir", "WorkingDirectory=")
    notes.approximated("hostname", "ProtectHostname=yes", f"a uts namespace of its own, but systemd 252 cannot name it {service.hostname!r}: it keeps the host's name")
    if service.readonly_root:
        notes.mapped("readonly_root", "ProtectSystem=strict")
    else:
        notes.unexpressible("readonly_root", "systemd has no writable layer over a read-only root: the root stays read-only (ProtectSystem=strict); "
                            "give the program a tmpfs: or a volume where it writes")  # fmt: skip
    if service.image == "host":
        notes.mapped("image", "(no RootDirectory=)", "the host's root, read-only (ProtectSystem=strict)")
    else:
        lines.append(("RootDirectory", escape_specifiers(service.image)))
        notes.mapped("image", "RootDirectory=", "the folder, read-only (ProtectSystem=strict)")
    return lines


def files(service: Service, notes: UnitNotes) -> Lines:
    """mounts, tmpfs, tmpfs_size, shm_size."""
    lines: Lines = []
    for mount in service.mounts:
        source = f"{VOLUMES_DIR}/{mount.volume}" if mount.volume else str(mount.source)
        directive = "BindReadOnlyPaths" if mount.readonly else "BindPaths"
        lines.append((directive, escape_specifiers(f"{source}:{mount.target}")))
    notes.mapped("mounts", "BindPaths=, BindReadOnlyPaths=", f"volumes are {VOLUMES_DIR}/NAME, as sandboxd keeps them") if service.mounts else notes.nothing("mounts", "none given")
    size = service.tmpfs_size
    own = {t.path for t in service.tmpfs}
    if "/tmp" not in own:
        lines.append(("TemporaryFileSystem", f"/tmp:size={size},mode=1777"))
    for entry in service.tmpfs:
        lines.append(("TemporaryFileSystem", escape_specifiers(f"{entry.path}:size={entry.size or size},mode=1777")))
    notes.mapped("tmpfs", "TemporaryFileSystem=") if service.tmpfs else notes.nothing("tmpfs", "none given")
    notes.approximated("tmpfs_size", "TemporaryFileSystem=/tmp:size=", "caps /tmp; the sandbox's own /run has no unit form: /run stays the host's, read-only")
    lines.append(("TemporaryFileSystem", f"/dev/shm:size={service.shm_size or size},mode=1777"))
    notes.mapped("shm_size", "TemporaryFileSystem=/dev/shm:size=")
    return lines


def life(service: Service, notes: UnitNotes, version: int) -> tuple[Lines, Lines]:
    """restart and its timing, start_limit, signals, timeouts, reload: ([Unit] lines, [Service] lines)."""
    unit: Lines = [("StartLimitBurst", str(service.start_limit.burst)), ("StartLimitIntervalSec", seconds(service.start_limit.interval))]
    notes.mapped("start_limit", "StartLimitBurst=, StartLimitIntervalSec=")
    lines: Lines = [("Restart", service.restart), ("RestartSec", seconds(service.restart_delay))]
    notes.mapped("restart", "Restart=")
    notes.mapped("restart_delay", "RestartSec=")
    if version >= 254:
        lines += [("RestartSteps", str(service.restart_steps)), ("RestartMaxDelaySec", seconds(service.restart_max_delay))]
        notes.mapped("restart_steps", "RestartSteps=")
        notes.mapped("restart_max_delay", "RestartMaxDelaySec=")
    elif service.restart_steps:
        notes.unexpressible("restart_steps", f"RestartSteps= came with systemd 254 (this export is for {version}): every restart waits RestartSec=")
        notes.unexpressible("restart_max_delay", f"RestartMaxDelaySec= came with systemd 254 (this export is for {version})")
    else:
        notes.nothing("restart_steps", "no growing delay asked for")
        notes.nothing("restart_max_delay", "only used with restart_steps")
    lines += [("KillSignal", signal.Signals(service.stop_signal).name), ("TimeoutStopSec", seconds(service.stop_timeout)),
              ("TimeoutStartSec", seconds(service.start_timeout))]  # fmt: skip
    notes.mapped("stop_signal", "KillSignal=")
    notes.mapped("stop_timeout", "TimeoutStopSec=")
    notes.mapped("start_timeout", "TimeoutStartSec=")
    if service.reload:
        lines.append(("ExecReload", quote_command(service.reload)))
        notes.mapped("reload", "ExecReload=", "run in the unit's sandbox, as sandboxd runs it in the service's")
        notes.nothing("reload_signal", "reload: runs instead")
    else:
        lines.append(("ExecReload", f"/bin/kill -s {signal.Signals(service.reload_signal).name} $MAINPID"))
        notes.mapped("reload_signal", "ExecReload=/bin/kill -s SIGNAL $MAINPID")
        notes.nothing("reload", "none given: reload_signal is sent")
    return unit, lines


def readiness(service: Service, notes: UnitNotes, completes: bool) -> Lines:
    """ready, notify_access, watchdog, fdstore_max: Type= and what goes with it. `completes`:
    a service waits for this one with `condition: completed` (then Type=oneshot)."""
    lines: Lines = []
    if completes:
        lines.append(("Type", "oneshot"))
    elif service.ready == "notify" or service.watchdog or service.fdstore_max:
        lines += [("Type", "notify"), ("NotifyAccess", service.notify_access)]
    else:
        lines.append(("Type", "exec"))
    if service.ready == "notify":
        notes.mapped("ready", "Type=notify")
    elif service.ready == "started":
        notes.mapped("ready", "Type=oneshot" if completes else "Type=exec", "ready once the program runs")
    else:
        check = service.ready
        probe = f"until timeout {seconds(check.timeout)} {shlex.join(check.exec)}; do sleep {check.interval}; done"
        lines.append(("ExecStartPost", quote_command((SHELL, "-c", probe))))
        notes.approximated("ready", "ExecStartPost=", "the unit is started once the check succeeds (within TimeoutStartSec=); "
                           f"systemd does not run it again after that, so {check.retries} failures in a row do not restart it")  # fmt: skip
    notes.mapped("notify_access", "NotifyAccess=") if service.notify_access != "main" or ("Type", "notify") in lines else notes.nothing("notify_access", "no notify socket")
    if service.watchdog:
        lines.append(("WatchdogSec", seconds(service.watchdog)))
        notes.mapped("watchdog", "WatchdogSec=")
    else:
        notes.nothing("watchdog", "none asked for")
    if service.fdstore_max:
        lines.append(("FileDescriptorStoreMax", str(service.fdstore_max)))
        notes.mapped("fdstore_max", "FileDescriptorStoreMax=")
    else:
        notes.nothing("fdstore_max", "no fd store")
    return lines
