"""The errors a client call raises: the classes of ``lavender_flight.protocol.errors``.

``from lavender_flight.client.errors import DatasetNotFound`` works as well as the protocol
import; the server raises the same classes, rebuilt on this side from the Flight error.
"""

from __future__ import annotations

from ..protocol.errors import *  # noqa: F403
from ..protocol.errors import __all__ as __all__
