"""Shell completion (bash, zsh) and the man page, generated from the one parser (parser.py) by
PyPI's shtab and argparse-manpage (pyproject.toml's `shell` extra), so that neither can drift from
`--help`. scripts/install-shell-files writes them where bash-completion, zsh and man look:

    python -m sandboxd.cli.completion --bash FILE --zsh FILE --man FILE

Neither package is imported by any verb: only this module, when it is run, needs them. Service
names complete from `sandboxd ps --services` (root's, as ps is; nothing otherwise), spec folders
as folders, files as files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sandboxd.cli.parser import build_parser

# The shell functions that complete a running stack's services: `ps --services` prints them.
BASH_SERVICES = """
_sandboxd_services() {
  compgen -W "$(sandboxd ps --services 2>/dev/null)" -- "$1"
}
"""
ZSH_SERVICES = """
_sandboxd_services() {
  local -a names
  names=(${(f)"$(sandboxd ps --services 2>/dev/null)"})
  compadd -a names
}
"""
SERVICES = {"bash": "_sandboxd_services", "zsh": "_sandboxd_services"}
SUMMARY = "run services from YAML unit specs in namespaces and cgroups, with sockets passed in"  # the NAME line


def completing_parser() -> argparse.ArgumentParser:
    """The parser, its arguments marked with what completes them (shtab's `complete` attribute)."""
    import shtab

    parser = build_parser()
    kinds = {"dir": shtab.DIRECTORY, "file": shtab.FILE, "env_file": shtab.FILE, "services": SERVICES, "service": SERVICES}
    for action in _actions(parser):
        if action.dest in kinds:
            action.complete = kinds[action.dest]  # type: ignore[attr-defined]
    return parser


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found: list[argparse.Action] = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _actions(sub)
    return found


def bash_completion() -> str:
    import shtab

    return str(shtab.complete(completing_parser(), shell="bash", preamble=BASH_SERVICES))


def zsh_completion() -> str:
    import shtab

    return str(shtab.complete(completing_parser(), shell="zsh", preamble=ZSH_SERVICES))


def man_page() -> str:
    """sandboxd(1) in roff: the synopsis, every verb and option with its help text."""
    from argparse_manpage.manpage import Manpage

    from sandboxd import __version__

    page = Manpage(build_parser())
    page.source = f"sandboxd {__version__}"
    page.manual = "sandboxd manual"
    page.description = SUMMARY
    return str(page)


def main(argv: list[str] | None = None) -> int:
    """Write the files asked for (the directories must exist)."""
    options = argparse.ArgumentParser(prog="python -m sandboxd.cli.completion", description="Write sandboxd's shell completion and man page.")
    options.add_argument("--bash", type=Path, metavar="FILE", help="the bash completion script")
    options.add_argument("--zsh", type=Path, metavar="FILE", help="the zsh completion function (_sandboxd)")
    options.add_argument("--man", type=Path, metavar="FILE", help="the man page, sandboxd.1")
    args = options.parse_args(argv)
    for path, make in ((args.bash, bash_completion), (args.zsh, zsh_completion), (args.man, man_page)):
        if path is not None:
            path.write_text(make())
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
