"""Nested dicts of arrays <-> flat named tensors: the one packing of pytrees into messages.

Stages compute on nested dicts (yields by sample, variation, region; network weights by
layer); messages carry flat named tensors. :func:`flatten` joins the keys with ``"."``,
:func:`unflatten` splits them again; every key must be a valid tensor-name piece, so the
round trip is exact::

    >>> import numpy as np
    >>> flat = flatten({"ttbar": {"nominal": {"4j1b": np.zeros(2)}}, "lumi": np.ones(())}, prefix="y")
    >>> sorted(flat)
    ['y.lumi', 'y.ttbar.nominal.4j1b']
    >>> unflatten(flat, prefix="y")["ttbar"]["nominal"]["4j1b"].tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from jacana.protocol.errors import StageError

SEP = "."
_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise StageError(f"key {key!r} under {where or 'the root'} cannot name a tensor"
                         " (letters, digits, '_' and '-' only)")
    return key


def join(*keys: str) -> str:
    """One tensor name from its keys (``join("yields", "ttbar", "nominal")`` -> ``"yields.ttbar.nominal"``)."""
    return SEP.join(_check_key(k, SEP.join(keys[:i])) for i, k in enumerate(keys))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a.b": x}`` (with ``prefix``: ``{"prefix.a.b": x}``); leaves are kept as they are."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], path: str) -> None:
        for key, value in node.items():
            name = f"{path}{SEP}{_check_key(key, path)}" if path else _check_key(key, path)
            if isinstance(value, Mapping):
                walk(value, name)
            else:
                out[name] = value

    walk(tree, prefix)
    return out


def unflatten(flat: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`flatten`; names outside ``prefix`` are ignored."""
    out: dict[str, Any] = {}
    head = f"{prefix}{SEP}" if prefix else ""
    for name, value in flat.items():
        if not name.startswith(head):
            continue
        *path, leaf = name[len(head):].split(SEP)
        node = out
        for key in path:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise StageError(f"tensor {name!r} nests under a leaf")
        node[leaf] = value
    return out
