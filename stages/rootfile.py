"""Opening a ROOT file's tree with errors that name the file and say what is wrong (missing file,
not a ROOT file, no such tree: the closest names). Used to read chunks and to count a file's entries."""

from __future__ import annotations

import difflib
from pathlib import Path

import uproot

from jacana.stages.errors import InputFileError


def open_tree(path: str, tree: str):
    """The TTree ``tree`` of the file at ``path`` (local or a URL), without uproot's array cache."""
    if "://" not in path and not Path(path).exists():
        raise InputFileError(path, "file does not exist")
    try:
        # No array cache: a chunk's arrays are read once, and uproot's default 100 MB cache per open
        # file kept a second copy of them alive (file <-> tree cycles wait for a full GC), which made
        # a streamed pass's memory grow with the number of chunks.
        f = uproot.open(path, array_cache=None)
    except Exception as exc:  # uproot raises many types for damaged files
        raise InputFileError(path, f"cannot open as a ROOT file ({type(exc).__name__}: {exc})") from None
    try:
        t = f[tree]
    except Exception:
        names = sorted({k.split(";")[0] for k in f.keys()})
        f.close()
        close = difflib.get_close_matches(tree, names, n=3)
        hint = f"; closest: {', '.join(close)}" if close else f"; it has: {', '.join(names[:10]) or 'nothing'}"
        raise InputFileError(path, f"no tree {tree!r}{hint}") from None
    if not isinstance(t, uproot.TTree):
        f.close()
        raise InputFileError(path, f"{tree!r} is a {type(t).__name__}, not a TTree")
    return t
