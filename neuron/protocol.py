"""inferd's step protocol, the worker's side (the Rust side and the
reference: crates/inferd-contract/src/wire.rs).

A frame is b"IFDW", a big-endian u32 length, then that many bytes of one
JSON message. Frames with another magic, a length of 0 or over MAX_FRAME,
or a body that is not a JSON object with a "type" are refused with
ProtocolError before anything is allocated for them.

Standard library only, so it runs in the pinned Neuron image as is.
"""
import json
import struct

PROTOCOL_VERSION = 1
MAX_FRAME = 64 << 20
MAGIC = b"IFDW"


class ProtocolError(Exception):
    """A frame that is not one of this protocol's."""


class Closed(Exception):
    """The stream ended before a frame began."""


def _read_exact(stream, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return bytes(buf)
        buf += chunk
    return bytes(buf)


def read_frame(stream):
    """The next message (a dict), from a binary stream."""
    head = _read_exact(stream, 8)
    if not head:
        raise Closed()
    if len(head) < 8:
        raise ProtocolError("truncated frame header")
    if head[:4] != MAGIC:
        raise ProtocolError(f"not a frame of this protocol (magic {head[:4]!r})")
    (length,) = struct.unpack(">I", head[4:])
    if length == 0 or length > MAX_FRAME:
        raise ProtocolError(f"a frame of {length} bytes; frames hold 1 to {MAX_FRAME} bytes")
    body = _read_exact(stream, length)
    if len(body) < length:
        raise ProtocolError("truncated frame body")
    try:
        msg = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"a frame that is not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("a frame that is not a message")
    return msg


def write_frame(stream, msg):
    body = json.dumps(msg, separators=(",", ":")).encode()
    if not body or len(body) > MAX_FRAME:
        raise ProtocolError(f"a message of {len(body)} bytes")
    stream.write(MAGIC + struct.pack(">I", len(body)) + body)
    stream.flush()


def failed(step, kind, message):
    """A `failed` message; kind is "refused", "hardware" or "internal"."""
    return {"type": "failed", "step": step, "kind": kind, "message": message}


def serve(stream_in, stream_out, manifest, run_step):
    """Runs the worker's side of a conversation: hello -> manifest, then
    each step through run_step(input) -> list of sampled tokens, until
    shutdown or the end of the stream. A refused step is answered and the
    conversation goes on; a malformed frame ends it (framing is lost).
    Returns the number of steps run."""
    hello = read_frame(stream_in)
    if hello.get("type") != "hello":
        raise ProtocolError(f"expected hello, got {hello.get('type')!r}")
    if hello.get("protocol") != PROTOCOL_VERSION:
        write_frame(stream_out, failed(None, "refused",
                                       f"the worker speaks protocol {PROTOCOL_VERSION}, inferd speaks {hello.get('protocol')}"))
        return 0
    write_frame(stream_out, {"type": "manifest", **manifest})
    steps = 0
    while True:
        try:
            msg = read_frame(stream_in)
        except Closed:
            return steps
        kind = msg["type"]
        if kind == "shutdown":
            return steps
        if kind != "step":
            write_frame(stream_out, failed(None, "refused", f"unexpected message {kind!r}"))
            continue
        step = msg.get("step")
        try:
            tokens = run_step(msg["input"])
        except ValueError as e:
            write_frame(stream_out, failed(step, "refused", str(e)))
            continue
        write_frame(stream_out, {"type": "done", "step": step,
                                 "output": {"Sampled": [{"token": t, "logprobs": None} for t in tokens]}})
        steps += 1
