"""The CLI's half of `sandboxd exec` while the command runs: copy bytes between the caller's
terminal (or pipes) and the command's pty master (or pipes), keep the window size, pass signals
on, and end the command when the caller's terminal goes away.

    with a terminal:  stdin (raw) ──▶ pty master ──▶ stdout      SIGWINCH ──▶ TIOCSWINSZ on the master
    without:          stdin ──▶ the command's stdin pipe; its stdout and stderr pipes ──▶ stdout, stderr

Raw mode: the caller's terminal passes every byte through (^C is byte 3), and the pty's own line
discipline inside the sandbox turns it into SIGINT for the command's foreground process group,
as it would on a terminal of its own. The caller's settings are restored on every way out
(errors, signals) except SIGKILL.

The caller's terminal hanging up (SIGHUP, or its stdin or stdout failing) hangs up the command's:
the pty master is closed (the kernel sends SIGHUP to the command's session), SIGHUP goes to the
command, and HANGUP_GRACE seconds later everything in the command's cgroup is killed. SIGINT,
SIGQUIT, SIGTERM, SIGUSR1 and SIGUSR2 sent to the CLI go to the command. When the command exits,
what it left running (background children) is killed through its cgroup, and what its pipes or
pty still hold is copied out, without waiting for an end of file that a process of the service,
holding a copy of the command's descriptor, could withhold.

One thread, one poll loop. The caller's descriptors are never made non-blocking (that flag
belongs to the open file, which the caller's shell shares); only ours are.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import termios
import time
import tty
from collections.abc import Iterator
from contextlib import contextmanager

from sandboxd.sandbox.protocol import ProtocolError, SetupFailed, decode_status

FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
HANGUP_GRACE = 2.0  # seconds between the command's SIGHUP and SIGKILL when the caller's terminal is gone
LEFTOVERS_TIMEOUT = 5.0  # at most this long for the killed rest of the command to be gone
CHUNK = 65536
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR
_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR


class _Copy:
    """One direction: what is read from `source` waits in `pending` until `target` takes it."""

    def __init__(self, source: int, target: int, name: str) -> None:
        self.source = source
        self.target = target
        self.name = name
        self.pending = b""
        self.reading = True

    @property
    def done(self) -> bool:
        return not self.reading and not self.pending


class Relay:
    """Copy, resize and pass signals on until the command has exited; then its exit code.

    `cgroup_kill` and `cgroup_events` are the command's cgroup's files (cgroup.kill, cgroup.events);
    the relay closes every descriptor it is given."""

    def __init__(
        self,
        command_pidfd: int,
        channel: socket.socket,
        tty: bool,
        our_ends: list[int],
        cgroup_kill: int,
        cgroup_events: int,
        stdin: int = 0,
        stdout: int = 1,
        stderr: int = 2,
    ) -> None:
        self.command_pidfd = command_pidfd
        self.cgroup_kill = cgroup_kill
        self.cgroup_events = cgroup_events
        self.channel: socket.socket | None = channel
        self.tty = tty
        self.ours = list(our_ends)  # [master] or [stdin_w, stdout_r, stderr_r]
        self.stdin, self.stdout = stdin, stdout
        self.stdin_is_tty = os.isatty(stdin)
        for fd in self.ours:
            os.set_blocking(fd, False)
        if tty:
            master = self.ours[0]
            self.input = _Copy(stdin, master, "stdin")
            self.outputs = [_Copy(master, stdout, "terminal")]
        else:
            self.input = _Copy(stdin, self.ours[0], "stdin")
            self.outputs = [_Copy(self.ours[1], stdout, "stdout"), _Copy(self.ours[2], stderr, "stderr")]
        self.failure: SetupFailed | None = None
        self.kill_at: float | None = None
        self.hung_up = False

    def run(self) -> tuple[int, SetupFailed | None]:
        """Relay until the command is gone: (its exit code, the failure its set-up reported)."""
        try:
            with self._signals() as wake, self._raw_terminal():
                self._resize()
                code = self._loop(wake)
                self._end_leftovers()
                self._drain()
        finally:
            for fd in [*self.ours, self.cgroup_kill, self.cgroup_events]:
                if fd >= 0:
                    os.close(fd)
            os.close(self.command_pidfd)
            if self.channel is not None:
                self.channel.close()
        return code, self.failure

    # ── the loop ──

    def _loop(self, wake: int) -> int:
        while True:
            interest: dict[int, int] = {wake: select.POLLIN, self.command_pidfd: select.POLLIN}
            if self.channel is not None:
                interest[self.channel.fileno()] = select.POLLIN
            for copy in (self.input, *self.outputs):
                if copy.pending:
                    interest[copy.target] = interest.get(copy.target, 0) | select.POLLOUT
                elif copy.reading:
                    interest[copy.source] = interest.get(copy.source, 0) | select.POLLIN
            poller = select.poll()
            for fd, mask in interest.items():
                poller.register(fd, mask)
            timeout = None if self.kill_at is None else max(0.0, self.kill_at - time.monotonic()) * 1000
            ready = dict(poller.poll(timeout))
            if self.kill_at is not None and time.monotonic() >= self.kill_at:
                self._kill_cgroup()
                self.kill_at = None
            if ready.get(wake):
                self._on_signals(wake)
            if self.channel is not None and ready.get(self.channel.fileno()):
                self._on_message()
            for copy in (self.input, *self.outputs):
                if copy.pending and ready.get(copy.target, 0) & _WRITABLE:
                    self._write(copy)
                elif copy.reading and not copy.pending and ready.get(copy.source, 0) & _READABLE:
                    self._read(copy)
            if ready.get(self.command_pidfd):
                return self._exit_code()

    def _read(self, copy: _Copy) -> None:
        try:
            data = os.read(copy.source, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: a pty master whose slaves are all closed, or a terminal gone
        if data:
            copy.pending = data
            return
        copy.reading = False
        if copy is self.input:
            if self.tty and self.stdin_is_tty:
                self._hang_up()  # the caller's terminal is gone
            elif not self.tty:
                self._close_ours(self.input.target)  # the command reads its end of file
        # An output's end needs nothing: the command's exit ends the loop.

    def _write(self, copy: _Copy) -> None:
        try:
            written = os.write(copy.target, copy.pending)
        except BlockingIOError:
            return
        except OSError:
            copy.pending = b""
            copy.reading = False
            if copy is self.input:
                return  # the command no longer reads its input
            if self.tty:
                self._hang_up()  # the caller's terminal is gone
            else:
                self._close_ours(copy.source)  # `| head` has read enough: the command gets EPIPE
            return
        copy.pending = copy.pending[written:]

    def _close_ours(self, fd: int) -> None:
        if fd in self.ours:
            os.close(fd)
            self.ours[self.ours.index(fd)] = -1
            for copy in (self.input, *self.outputs):
                if fd in (copy.source, copy.target):
                    copy.reading = False
                    copy.pending = b""

    def _hang_up(self) -> None:
        if self.hung_up:
            return
        self.hung_up = True
        self.input.reading = False
        if self.tty:
            self._close_ours(self.ours[0])  # the kernel hangs up the pty: SIGHUP to its session
        self._signal_command(signal.SIGHUP)
        self.kill_at = time.monotonic() + HANGUP_GRACE

    def _on_signals(self, wake: int) -> None:
        try:
            received = os.read(wake, 256)
        except BlockingIOError:
            return
        for sig in received:
            if sig == signal.SIGWINCH:
                self._resize()
            elif sig == signal.SIGHUP:
                self._hang_up()
            else:
                self._signal_command(sig)

    def _on_message(self) -> bool:
        """Read one message from the command's set-up; False if there is none to read now."""
        assert self.channel is not None
        try:
            data = self.channel.recv(4096)
        except BlockingIOError:
            return False
        if not data:
            self.channel.close()  # the command is executing (close-on-exec), or gone
            self.channel = None
            return False
        try:
            message = decode_status(data)
        except ProtocolError:
            return True
        if isinstance(message, SetupFailed):
            self.failure = message
        return True

    def _signal_command(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self.command_pidfd, sig)
        except ProcessLookupError:
            pass

    def _kill_cgroup(self) -> None:
        try:
            os.write(self.cgroup_kill, b"1")
        except OSError:
            pass  # gone already (the sandbox ended and its cgroups with it)

    def _exit_code(self) -> int:
        result = os.waitid(os.P_PIDFD, self.command_pidfd, os.WEXITED)
        assert result is not None
        return result.si_status if result.si_code == os.CLD_EXITED else 128 + result.si_status

    def _end_leftovers(self) -> None:
        """Kill what the command left running (background children, daemons) and wait until its
        cgroup is empty, so that nothing of it runs once exec has returned."""
        self._kill_cgroup()
        deadline = time.monotonic() + LEFTOVERS_TIMEOUT
        poller = select.poll()
        poller.register(self.cgroup_events, select.POLLPRI)  # kernfs wakes it when the file changes
        while time.monotonic() < deadline:
            try:
                if b"populated 0" in os.pread(self.cgroup_events, 4096, 0):
                    return
            except OSError:
                return
            poller.poll(max(0.0, deadline - time.monotonic()) * 1000)

    def _drain(self) -> None:
        """The command's processes have exited: copy out what its pipes or pty still hold, and
        read the last thing its set-up may have said."""
        for copy in self.outputs:
            while copy.pending or copy.reading:
                if not copy.pending:
                    self._read(copy)
                    if not copy.pending:
                        break  # nothing more now (EAGAIN) or ever (EOF, EIO)
                try:
                    written = os.write(copy.target, copy.pending)
                except OSError:
                    break
                copy.pending = copy.pending[written:]
        if self.channel is not None:
            self.channel.setblocking(False)
            while self.channel is not None and self._on_message():
                pass

    # ── the caller's terminal and signals ──

    def _resize(self) -> None:
        if not self.tty or self.ours[0] < 0:
            return
        for fd in (self.stdin, self.stdout):
            if os.isatty(fd):
                try:
                    termios.tcsetwinsize(self.ours[0], termios.tcgetwinsize(fd))
                except (termios.error, OSError):
                    pass
                return

    @contextmanager
    def _raw_terminal(self) -> Iterator[None]:
        if not (self.tty and self.stdin_is_tty):
            yield
            return
        saved = termios.tcgetattr(self.stdin)
        tty.setraw(self.stdin, termios.TCSADRAIN)
        try:
            yield
        finally:
            try:
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal is gone

    @contextmanager
    def _signals(self) -> Iterator[int]:
        """Signals arrive as bytes on a pipe the loop polls (set_wakeup_fd), handled there."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        handled = (*FORWARDED_SIGNALS, signal.SIGWINCH)
        previous = {sig: signal.signal(sig, _note) for sig in handled}
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            yield wake_r
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)


def _note(_sig: int, _frame: object) -> None:
    """The signal's number is already on the wakeup pipe; the loop acts on it."""
