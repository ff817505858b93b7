"""The one exception the wire layer raises for bytes or values that cannot travel."""

from wire._status import Status


class WireError(ValueError):
    """Bad bytes from a peer, or a value that does not fit its field.

    ``status`` is the code to answer with. ``fatal`` says whether the byte stream is
    still usable: a fatal error (bad magic, version, length, CRC, layout) means the
    peer cannot frame its messages and the connection must close after an ERROR
    reply; a non-fatal one (unknown opcode, amount out of range) concerns one intact
    frame, which was consumed, so the receiver answers it and reads on.
    ``request_id`` is the offending frame's id when its header was readable, else 0.
    """

    def __init__(
        self, status: Status, detail: str, *, fatal: bool = True, request_id: int = 0
    ) -> None:
        super().__init__(f"{status.name} ({status.value}): {detail}")
        self.status = status
        self.detail = detail
        self.fatal = fatal
        self.request_id = request_id
