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
PAD_TOKEN = 0
PAD_SLOT = 0xFFFFFFFF


class ProtocolError(Exception):
    """A frame that is not one of this protocol's."""


class Closed(Exception):
    """The stream ended before a frame began."""


class HardwareError(Exception):
    """The device failed: answered `hardware`, so inferd takes the instance
    out of service."""


COMPILED_FILE = "inferd-compiled.json"


def manifest_from_compiled(compiled):
    """The manifest a worker answers hello with, from the inferd-compiled.json
    that compile.py writes (mirrors CompiledModel::manifest in
    crates/inferd-exec/src/neuron/standin.rs)."""
    dtype = compiled["dtype"]
    return {
        "protocol": PROTOCOL_VERSION,
        "model": compiled["model"],
        "kv_layout": compiled["kv_layout"],
        "capabilities": {
            "device": "neuron",
            "block_size": compiled["block_size"],
            "num_blocks": compiled["num_blocks"],
            "max_model_len": compiled["max_model_len"],
            "vocab_size": compiled["vocab_size"],
            "compute_dtype": dtype,
            "supported_dtypes": [dtype],
            "kv_dtype": dtype,
            "shape_buckets": {"batch_sizes": compiled["batch_sizes"], "token_counts": compiled["token_counts"]},
            "device_sampling": {"max_top_k": compiled["max_top_k"]},
        },
    }


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


def check_step(step, buckets):
    """Checks a padded step (crates/inferd-contract/src/padded.rs) against
    the compiled buckets: its shape is exactly one of them, every array has
    that shape, and padding is padding. Returns the number of real
    sequences. Raises ValueError (answered as `refused`) otherwise."""
    shape = step.get("shape") or {}
    batch, tokens = shape.get("batch"), shape.get("tokens")
    if batch not in buckets["batch_sizes"] or tokens not in buckets["token_counts"]:
        raise ValueError(f"step shape {batch}x{tokens} is not a compiled bucket")
    width = step["max_blocks_per_seq"]
    for name, want in (("token_ids", tokens), ("positions", tokens), ("slot_mapping", tokens),
                       ("query_start", batch + 1), ("context_lens", batch), ("block_tables", batch * width)):
        if len(step[name]) != want:
            raise ValueError(f"{name} has {len(step[name])} entries; the bucket {batch}x{tokens} needs {want}")
    real = len(step["seq_ids"])
    if not 0 < real <= batch:
        raise ValueError(f"{real} sequences in a bucket of batch {batch}")
    used = step["query_start"][real]
    if (any(q != used for q in step["query_start"][real:])
            or any(step["context_lens"][real:])
            or any(step["block_tables"][real * width:])
            or any(t != PAD_TOKEN for t in step["token_ids"][used:])
            or any(step["positions"][used:])
            or any(x != PAD_SLOT for x in step["slot_mapping"][used:])):
        raise ValueError("padding rows and positions must be empty")
    if step["phase"] == "decode" and any(
            step["query_start"][s + 1] - step["query_start"][s] != 1 for s in range(real)):
        raise ValueError("a decode step runs one token per sequence")
    return real


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
        except HardwareError as e:
            write_frame(stream_out, failed(step, "hardware", str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - any other failure is reported, then inferd restarts us
            write_frame(stream_out, failed(step, "internal", f"{type(e).__name__}: {e}"))
            continue
        write_frame(stream_out, {"type": "done", "step": step,
                                 "output": {"Sampled": [{"token": t, "logprobs": None} for t in tokens]}})
        steps += 1
