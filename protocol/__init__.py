"""jacana.protocol: how stages talk.

The stage contract (:mod:`.stage`), composition in Jacobian and VJP modes and
JAX interop (:mod:`.pipeline`), messages and their codec (:mod:`.message`),
provenance of additive partials (:mod:`.provenance`), stage calls as messages
(:mod:`.rpc`), transports (:mod:`.transport`, :mod:`.server`). See SPEC.md.
Importing this package does not import JAX.
"""

from jacana.protocol.errors import ProtocolError
from jacana.protocol.message import Message, decode, encode, params_digest
from jacana.protocol.provenance import Provenance, merge

__all__ = ["ProtocolError", "Message", "decode", "encode", "params_digest", "Provenance", "merge"]
