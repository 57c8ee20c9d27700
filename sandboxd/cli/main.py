"""The `sandboxd` command line: `main()` parses the arguments, runs the verb and turns the errors
it raises into a message on stderr and the error's exit code.

Only what a verb needs is imported when it runs, so quick verbs stay quick: the parser
(parser.py) builds the sub-parser of the verb given alone and imports its command module, and
the command modules import at the top only the standard library and sandboxd.errors. The verbs are in stack.py (up, reload of a stack, down, ls, config), services.py
(ps, start, stop, restart, kill, reload of services), logs.py (logs; times.py parses --since and
--until), stats.py (stats), run.py (exec) and store.py (image, volume); results.py builds what
--json prints for a whole stack; client.py is the control socket's client. completion.py writes
the shell completion and the man page from the same parser.
"""

from __future__ import annotations

import os
import sys

from sandboxd.cli.parser import VERBS, build_parser
from sandboxd.errors import HostError, SandboxdError, SpecErrors


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    # A verb first (as every command line but `sandboxd --help` and `--version` has it): only its
    # sub-parser is built, and only its command module imported (parser.py).
    parser = build_parser(words[0] if words and words[0] in VERBS else None)
    args = parser.parse_args(words)
    if args.version:
        from sandboxd import __version__

        print(__version__)
        return 0
    if not args.verb:
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
        return result
    except SpecErrors as e:
        print(f"sandboxd: {len(e.errors)} problem{'s' if len(e.errors) != 1 else ''} in {getattr(args, 'dir', '')}:", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return e.exit_code
    except SandboxdError as e:
        print(f"sandboxd: {e}", file=sys.stderr)
        return e.exit_code
    except PermissionError as e:  # a file of root's that a verb read without checking first
        where = f": {e.filename}" if e.filename else ""
        print(f"sandboxd: permission denied{where}; sandboxd {args.verb} needs root here: run it as root (e.g. sudo sandboxd {args.verb} ...)", file=sys.stderr)
        return HostError.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sandboxd ps --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
