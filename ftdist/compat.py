"""Where ftdist relies on a library's internals, it fails loudly when another version lacks them.

A private attribute can vanish or change meaning in any release. Each place that patches or reads
one goes through `require_attr` (or raises `library_error` after its own check), so a missing
internal stops the run with the library, its installed version and what ftdist needed it for,
instead of an AttributeError deep in a library or, worse, a silent no-op (a patch that is never
called: QLoRA loading then quantizes 70B on the CPU for 47 minutes).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

# The exact versions the test suite passed on (a source checkout has it; an installed wheel may not).
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


class LibraryInternalsError(RuntimeError):
    """A library internal that ftdist patches or reads is missing (or unused) in the installed version."""


def library_version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def tested_version(library: str) -> str:
    """`library` and its version pinned in constraints.txt."""
    try:
        text = CONSTRAINTS.read_text()
    except OSError:
        return f"the {library} pinned"
    pin = re.search(rf"^{re.escape(library)}==(\S+)", text, flags=re.MULTILINE | re.IGNORECASE)
    return f"{library} {pin.group(1)}" if pin else f"the {library} pinned"


def library_error(library: str, problem: str, needed_for: str) -> LibraryInternalsError:
    """`ftdist: LIB X.Y.Z: PROBLEM; NEEDED_FOR (ftdist is tested with LIB A.B.C in its constraints.txt)`."""
    return LibraryInternalsError(
        f"ftdist: {library} {library_version(library)}: {problem}; {needed_for} "
        f"(ftdist is tested with {tested_version(library)} in its constraints.txt)"
    )


def _owner_name(obj) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def require_attr(obj, name: str, library: str, needed_for: str):
    """obj.name, or a LibraryInternalsError naming `library`'s installed version."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise library_error(library, f"{_owner_name(obj)}.{name} not found", needed_for) from None


def require_private(module: str, name: str, library: str, needed_for: str):
    """`name` from a library's private module (e.g. hydra._internal...), or a LibraryInternalsError."""
    import importlib

    try:
        owner = importlib.import_module(module)
    except ImportError as e:
        raise library_error(library, f"{module} cannot be imported ({e})", needed_for) from None
    return require_attr(owner, name, library, needed_for)
