"""Fuzz the wire decoder: any bytes give frames or WireError, and frames re-encode exactly.

Run (from the repository root)::

    .venv/bin/python fuzz/fuzz_decoder.py -atheris_runs=200000
    .venv/bin/python fuzz/fuzz_decoder.py -max_total_time=60

An input is a control byte (how the stream is chunked, see ``fuzz.frames.chunks``) and
a byte stream. The same chunks go to a server's decoder (``Decoder(Sender.CLIENT)``) and
to a client's (``Decoder(Sender.SERVER)``), each drained after every chunk. A finding is:

- any exception from the decoder other than WireError, or a WireError with a status
  that cannot be sent (APPROVED) or a request id outside 32 bits;
- a decoder that raised a fatal error and then yields anything but WireError again;
- a decoded frame whose re-encoding differs from the bytes it was decoded from (the
  only difference allowed is the account's letter case, which LOGIN normalises, §3.1);
- the two decoders disagreeing on where frames end, or both accepting one frame: a
  frame is a request or a reply, so the other side must refuse it as the wrong direction.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in {None, ""}:  # run as a script: make the ``fuzz`` package importable
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fuzz.frames import (
    WHOLE_STREAM,
    Finding,
    chunks,
    golden_frames,
    negative_frames,
    split_input,
)
from wire import Decoder, Frame, Opcode, Sender, Status, WireError, encode
from wire._codec import frame_bytes
from wire._layout import CRC_BYTES, HEADER_BYTES
from wire._limits import ACCOUNT_BYTES, REQUEST_ID_MAX

DecoderFactory = Callable[[Sender], Decoder]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``next_frame`` call did: where the consumed bytes end, and how it went."""

    end: int
    kind: str  # "frame", "refused" (non-fatal WireError) or "fatal"
    status: Status | None = None


def test_one_input(data: bytes) -> None:
    """The harness's check: raises ``Finding`` if the decoder misbehaves on ``data``."""
    check_stream(data, Decoder)


def check_stream(data: bytes, make_decoder: DecoderFactory) -> None:
    """``test_one_input`` with the decoder injectable, so tests can prove checks fail."""
    control, stream = split_input(data)
    by_server = decode_stream(make_decoder(Sender.CLIENT), stream, control)
    by_client = decode_stream(make_decoder(Sender.SERVER), stream, control)
    check_directions_agree(by_server, by_client)


def decode_stream(decoder: Decoder, stream: bytes, control: int) -> list[Outcome]:
    """Feed the stream in the control byte's chunks, draining and checking every frame."""
    outcomes: list[Outcome] = []
    fed = 0
    for chunk in chunks(stream, control):
        decoder.receive_data(chunk)
        fed += len(chunk)
        while True:
            start = fed - decoder.buffered_bytes
            try:
                frame = decoder.next_frame()
            except WireError as error:
                check_error(error)
                fatal = bool(error.fatal)
                outcomes.append(Outcome(fed - decoder.buffered_bytes,
                                        "fatal" if fatal else "refused", error.status))
                if fatal:
                    check_stays_stopped(decoder)
                    return outcomes
                continue
            except Exception as error:
                raise Finding(f"decoder raised {type(error).__name__}, not WireError: {error}"
                              ) from error
            if frame is None:
                break
            end = fed - decoder.buffered_bytes
            check_reencodes(frame, stream[start:end])
            outcomes.append(Outcome(end, "frame"))
    return outcomes


def check_error(error: WireError) -> None:
    """A WireError must be answerable: a refusing status and a request id that fits."""
    if not isinstance(error.status, Status) or error.status is Status.APPROVED:
        raise Finding(f"WireError with status {error.status!r}")
    if type(error.request_id) is not int or not 0 <= error.request_id <= REQUEST_ID_MAX:
        raise Finding(f"WireError with request id {error.request_id!r}")


def check_stays_stopped(decoder: Decoder) -> None:
    """After a fatal error the stream is unframed: the decoder must refuse, again, only so."""
    decoder.receive_data(frame_bytes(Opcode.PING, 1, b""))
    try:
        frame = decoder.next_frame()
    except WireError as error:
        check_error(error)
        return
    except Exception as error:
        raise Finding(f"stopped decoder raised {type(error).__name__}") from error
    raise Finding(f"stopped decoder yielded {frame!r} after a fatal error")


def canonical(data: bytes) -> bytes:
    """The bytes ``encode`` gives for a frame the decoder accepted: the account of a LOGIN
    or RESUME in upper case.

    The account is the one field with two spellings (§3.1: ``ab-12345`` is ``AB-12345``);
    every other field has exactly one encoding, so any other difference is a finding.
    """
    if data[3] not in (Opcode.LOGIN, Opcode.RESUME):
        return data
    account_end = HEADER_BYTES + ACCOUNT_BYTES
    payload = data[HEADER_BYTES:account_end].upper() + data[
        account_end:-CRC_BYTES]
    return frame_bytes(data[3], int.from_bytes(data[4:8], "big"), payload)


def check_reencodes(frame: Frame, data: bytes) -> None:
    try:
        again = encode(frame.message, frame.request_id)
    except Exception as error:
        raise Finding(f"decoded {frame!r} does not encode: {error!r}") from error
    if again != canonical(data):
        raise Finding(f"{frame!r} came from {data.hex()} but encodes as {again.hex()}")


def check_directions_agree(by_server: list[Outcome], by_client: list[Outcome]) -> None:
    """Both sides frame a stream alike; what one side accepts, the other refuses as misdirected.

    Framing (magic, version, length, CRC) does not depend on the direction, so the two
    decoders consume the same bytes per call until one of them stops. Compared only up
    to the shorter list: after a payload error one side may stop and the other go on.
    """
    for server, client in zip(by_server, by_client, strict=False):
        if server.end != client.end:
            raise Finding(f"sides disagree on a frame's end: {server} vs {client}")
        for accepted, other in ((server, client), (client, server)):
            if accepted.kind == "frame" and (
                other.kind != "refused" or other.status is not Status.INVALID_TRANSACTION
            ):
                raise Finding(f"a frame one side accepts, the other handled as {other}")


def seeds() -> list[bytes]:
    """Every golden and negative vector, whole and byte by byte, and each side's frames glued."""
    out = []
    for frame in (*golden_frames(), *negative_frames()):
        out.append(bytes([WHOLE_STREAM]) + frame)
        out.append(bytes([0x00]) + frame)
    for sender in ("client", "server"):
        out.append(bytes([0x37]) + b"".join(golden_frames(sender)))
    return out


if __name__ == "__main__":
    from fuzz.runner import main

    main(test_one_input, seeds(), sys.argv)
