"""`python -m ftdist.data COMMAND ...`: see ftdist.data.tool."""

from __future__ import annotations

import sys


def cli() -> None:
    from ftdist.data.tool import main

    sys.exit(main())


if __name__ == "__main__":
    cli()
