"""The `localmix` command line (see main.py)."""

import sys


def main() -> None:
    """The `localmix` command. Its modules (numpy, Numba, the kernels) are imported here, where a
    Ctrl-C during that second or more ends the command like one at any later moment: exit 130."""
    try:
        from localmix.cli.main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        raise SystemExit(130)
    run()
