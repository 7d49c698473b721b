"""h2's connection and stream, with their send windows kept outside them.

h2 keeps each send window (``outbound_flow_control_window``) as a plain attribute of its
connection and stream objects; the data path charges both for every DATA frame it writes
(``core.HboneConnection._frame_header``), and from compiled code an attribute of a Python
object is a dictionary lookup in an object of its own. Here each window is a property onto
a holder the connection's core made (``core._Credit``, compiled, read natively there); h2
reads and writes it as before, through the property, on the rarer paths that are its own
(WINDOW_UPDATE, SETTINGS). This module stays interpreted: a compiled class cannot extend
h2's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.exceptions
import h2.stream


class _CreditWindow:
    """``outbound_flow_control_window`` as ``credit.value`` (first in the bases)."""

    credit: Any

    @property
    def outbound_flow_control_window(self) -> int:
        value: int = self.credit.value
        return value

    @outbound_flow_control_window.setter
    def outbound_flow_control_window(self, value: int) -> None:
        self.credit.value = value


class Stream(_CreditWindow, h2.stream.H2Stream):
    """``H2Stream`` whose send window is ``credit.value``."""

    def __init__(self, stream_id: int, config: h2.config.H2Configuration,
                 inbound_window_size: int, outbound_window_size: int, credit: Any) -> None:
        self.credit = credit  # before h2 sets the window
        super().__init__(stream_id, config, inbound_window_size, outbound_window_size)


class Connection(_CreditWindow, h2.connection.H2Connection):
    """``H2Connection`` whose send window is ``credit.value`` and whose streams are
    ``Stream``s, each with a holder from ``new_credit``."""

    def __init__(self, config: h2.config.H2Configuration, credit: Any,
                 new_credit: Callable[[], Any]) -> None:
        self.credit = credit  # before h2 sets the window
        self.new_credit = new_credit
        super().__init__(config=config)

    def begin_stream(self, stream_id: int, inbound_window_size: int,
                     outbound_window_size: int, max_frame_size: int) -> Stream:
        """h2's ``_begin_new_stream`` past its parity check, with the settings given (the
        data path keeps them) and without its log calls: a new ``Stream`` in h2's table,
        the highest stream id of its side moved on."""
        outbound = self._stream_id_is_outbound(stream_id)
        highest = self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
        if stream_id <= highest:
            raise h2.exceptions.StreamIDTooLowError(stream_id, highest)
        stream = Stream(stream_id, self.config, inbound_window_size, outbound_window_size,
                        self.new_credit())
        stream.max_outbound_frame_size = max_frame_size
        self.streams[stream_id] = stream
        if outbound:
            self.highest_outbound_stream_id = stream_id
        else:
            self.highest_inbound_stream_id = stream_id
        return stream

    def _begin_new_stream(self, stream_id: int,
                          allowed_ids: h2.connection.AllowedStreamIDs) -> h2.stream.H2Stream:
        """h2's own (for the frames h2 handles), making a ``Stream``."""
        if (stream_id % 2) != int(allowed_ids):
            raise h2.exceptions.ProtocolError("Invalid stream ID for peer.")
        return self.begin_stream(stream_id, self.local_settings.initial_window_size,
                                 self.remote_settings.initial_window_size,
                                 self.max_outbound_frame_size)
