"""Errors of the facility layer: a cluster, profile or executor that cannot do what was asked."""

from __future__ import annotations

from jacana.protocol.errors import JacanaError


class FacilityError(JacanaError, RuntimeError):
    """The cluster cannot be reached or set up, or a profile is invalid; the message says what to do."""
