"""The entry an upgrade executes (upgrade.py): `python -P -m sandboxd.daemon.reexec check FD` run
as a child by the old supervisor, to say whether this sandboxd can take over from the record in
memfd FD; and `... resume FD`, which the supervisor's own process becomes with execve.

`check` prints one JSON object, {"ok": true, "version": V} or {"ok": false, "error": WHY}, and
exits 0 or 1. `resume` takes over the stack and exits with the stack's exit code.
"""

from __future__ import annotations

import json
import os
import sys


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def check(fd: int) -> int:
    """Can this sandboxd take over from the record? Nothing is changed, nothing kept."""
    from sandboxd import __version__
    from sandboxd.daemon.record import RecordRefused, decode
    from sandboxd.daemon.resume import check_descriptors, spec_of

    try:
        record = decode(_read(fd))
        spec_of(record)
        check_descriptors(record)
    except (RecordRefused, OSError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        return 1
    print(json.dumps({"ok": True, "version": __version__}))
    return 0


def resume(fd: int) -> int:
    """Become the stack's supervisor again, from the record."""
    # As `sandboxd up` does (cli/stack.py): asyncio without OpenSSL.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from sandboxd.daemon.record import decode
    from sandboxd.daemon.resume import take_over

    data = _read(fd)
    os.close(fd)
    return take_over(decode(data))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "resume") or not argv[1].isdigit():
        print("usage: python -m sandboxd.daemon.reexec check|resume FD (run by sandboxd upgrade)", file=sys.stderr)
        return 2
    return check(int(argv[1])) if argv[0] == "check" else resume(int(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
