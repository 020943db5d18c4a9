"""The protocol's own exceptions.

Every failure to decode, validate, authenticate or serve a message raises a
subclass of :class:`ProtocolError`; nothing in the wire path lets another
exception type escape. Each class has a stable ``code`` that travels in error
messages, so a peer in any language can map it back::

    >>> from jacana.protocol.errors import error_class, MalformedMessage
    >>> error_class("malformed") is MalformedMessage
    True
"""

from __future__ import annotations


class JacanaError(Exception):
    """Root of every error jacana raises on purpose (protocol, stages, facility, analysis)."""


class ProtocolError(JacanaError):
    """Base class of every jacana protocol error."""

    code = "protocol"


class MalformedMessage(ProtocolError):
    """The bytes are not a well-formed message (bad magic, JSON, field, layout)."""

    code = "malformed"


class TruncatedMessage(MalformedMessage):
    """The message or frame ends before its declared length."""

    code = "truncated"


class MessageTooLarge(ProtocolError):
    """A frame or message exceeds the configured size limit."""

    code = "too_large"


class VersionMismatch(ProtocolError):
    """The header names another protocol or an unsupported major version."""

    code = "version"


class UnsupportedDType(ProtocolError):
    """A tensor uses a dtype outside the protocol's allowed set."""

    code = "dtype"


class AuthenticationError(ProtocolError):
    """The peer did not present the right token."""

    code = "auth"


class ProvenanceError(ProtocolError):
    """Partial results cannot be summed: duplicate, overlapping or missing chunks."""

    code = "provenance"


class StageError(ProtocolError):
    """A stage failed to evaluate a request (bad inputs, unsupported kind, ...)."""

    code = "stage"


class RemoteError(ProtocolError):
    """A peer answered with an error message whose code is not known locally."""

    code = "remote"


class TransportError(ProtocolError):
    """The transport failed: connection closed, timeout, peer process died."""

    code = "transport"


_CLASSES = {
    cls.code: cls
    for cls in (
        ProtocolError,
        MalformedMessage,
        TruncatedMessage,
        MessageTooLarge,
        VersionMismatch,
        UnsupportedDType,
        AuthenticationError,
        ProvenanceError,
        StageError,
        RemoteError,
        TransportError,
    )
}


def error_class(code: str) -> type[ProtocolError]:
    """The exception class for an error ``code`` (``RemoteError`` if unknown)."""
    return _CLASSES.get(code, RemoteError)
