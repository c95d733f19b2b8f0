#!/usr/bin/env python3
"""A step worker with a deterministic fake model instead of NxDI, for
testing the protocol layer without Neuron hardware (make test runs it from
crates/inferd-contract/tests/python_worker.rs).

Usage: python3 neuron/fake_worker.py MANIFEST.json   (speaks on stdin/stdout)

The manifest (what a real worker would read from its compiled artifacts)
is given as a file. The fake enforces what a compiled model would: every
step is padded to exactly a compiled bucket (protocol.check_step), a sequence is decoded only after
its prefill and at the next position, and nothing runs past max_model_len.
The token it samples for a row is (token * 31 + position * 7 + 1) % vocab.
"""
import json
import sys

import protocol


def make_step(manifest):
    caps = manifest["capabilities"]
    buckets = caps["shape_buckets"]
    vocab = caps["vocab_size"]
    max_len = caps["max_model_len"]
    context = {}  # sequence id -> tokens it holds

    def run_step(inp):
        protocol.check_step(inp, buckets)
        for sid in inp.get("finished", []) + inp.get("preempted", []):
            context.pop(sid, None)
        starts = inp["query_start"]
        updates = {}
        for s, sid in enumerate(inp["seq_ids"]):
            first = inp["positions"][starts[s]]
            end = inp["positions"][starts[s + 1] - 1] + 1
            held = context.get(sid, 0)
            if first != held:
                raise ValueError(f"sequence {sid}: positions start at {first} but it holds {held} tokens")
            if end > max_len:
                raise ValueError(f"sequence {sid}: position {end - 1} is past max_model_len {max_len}")
            updates[sid] = end
        context.update(updates)
        tokens, positions = inp["token_ids"], inp["positions"]
        return [(tokens[r] * 31 + positions[r] * 7 + 1) % vocab for r in inp["logits_rows"]]

    return run_step


def main():
    with open(sys.argv[1]) as f:
        manifest = json.load(f)
    try:
        protocol.serve(sys.stdin.buffer, sys.stdout.buffer, manifest, make_step(manifest))
    except protocol.ProtocolError as e:
        print(f"fake_worker: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
