r"""What fitting libraries print (MINUIT's C++ messages, pyhf's logged OptimizeResult) captured, so that
jacana can say it in one line instead of a screenful.

>>> import os
>>> with captured_output() as lines:  # what C++ code writes to file descriptor 2, say
...     _ = os.write(2, b"W MnPosDef Matrix forced pos-def\n")
>>> lines
['W MnPosDef Matrix forced pos-def']
>>> one_line(lines)
'1 message: W MnPosDef Matrix forced pos-def'
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def captured_output():
    """Capture everything written to stdout and stderr, by Python or by C/C++ code (file descriptors
    1 and 2 are redirected): yields a list that receives the captured lines when the block ends."""
    lines: list[str] = []
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            lines.extend(line for line in tmp.read().decode("utf-8", "replace").splitlines() if line.strip())


def one_line(lines: list[str], limit: int = 3) -> str:
    """``N messages: first; second; ...`` (distinct lines, at most ``limit`` shown); empty if none."""
    distinct = list(dict.fromkeys(line.strip() for line in lines))
    if not distinct:
        return ""
    more = f"; ... ({len(distinct) - limit} more)" if len(distinct) > limit else ""
    return f"{len(lines)} message{'s' if len(lines) != 1 else ''}: " + "; ".join(distinct[:limit]) + more
