#!/usr/bin/env python3
"""inferd's step worker for AWS Inferentia2: holds a model compiled by
compile.py with NxD Inference and runs one inferd step per message.

inferd starts it (--neuron-worker) as
    python3 worker.py --socket PATH --model-dir COMPILED_DIR --model HF_DIR
and supervises it: a crash or a hung step makes inferd restart it; a step
answered `hardware` takes the instance out of service.

NOT YET RUN ON INFERENTIA. It is written against NxDI 0.10's documented
API (the pinned image in README.md); the protocol layer under it
(protocol.py) is tested in inferd's `make test`, the NxDI calls are not.
The calls into NxDI are all in NxdiModel, so a fix found on hardware is
a fix in one place. neuron/README.md lists what to check on hardware.

Only this process touches the Neuron runtime: it claims the NeuronCores
named by NEURON_RT_VISIBLE_CORES when it loads the model.
"""
import argparse
import json
import os
import re
import socket
import sys

import protocol

# Neuron runtime status codes that mean the device is unhealthy (replace
# the instance) rather than that one call went wrong.
HARDWARE_STATUS = {6, 1200, 1201, 1202, 1203, 1204, 1205, 1206}


def hardware_status(error):
    """The Neuron runtime status named in an exception's text, if it is a
    hardware one."""
    for match in re.finditer(r"(?:status|NRT_STATUS|nrt status)[ =:]*(\d+)", str(error), re.IGNORECASE):
        if int(match.group(1)) in HARDWARE_STATUS:
            return int(match.group(1))
    return None


class NxdiModel:
    """The compiled NxDI model: context encoding (prefill) and token
    generation (decode) submodels over NxDI's block KV layout, sampling on
    the device."""

    def __init__(self, compiled_dir, compiled):
        import torch  # noqa: F401  (from the Neuron image)
        from neuronx_distributed_inference.models.llama.modeling_llama import NeuronLlamaForCausalLM

        self.compiled = compiled
        self.model = NeuronLlamaForCausalLM(compiled_dir)
        # Loads the compiled graphs and weights onto the NeuronCores and
        # warms them up, so the first step is not the slowest.
        self.model.load(compiled_dir)

    def run(self, rows, phase):
        """rows: one dict per real sequence (ids, positions, slots, block
        table, context length, sampling); returns one token per row that
        wants one. Prefill runs one context-encoding call per sequence
        (compiled with ctx_batch_size 1), each padded to the smallest
        compiled prompt bucket; decode runs one token-generation call over
        every row, padded to the compiled batch."""
        import torch

        c = self.compiled
        if phase == "prefill":
            tokens = []
            for row in rows:
                width = next(t for t in c["token_counts"] if t >= len(row["ids"]))
                out = self._call(torch, [row], width, batch=1)
                if row["sample"]:
                    tokens.append(out[0])
            return tokens
        out = self._call(torch, rows, 1, batch=max(c["batch_sizes"]))
        return [t for t, row in zip(out, rows) if row["sample"]]

    def _call(self, torch, rows, width, batch):
        c = self.compiled
        blocks = max(len(r["blocks"]) for r in rows)
        pad_rows = batch - len(rows)

        def padded(values, fill):
            return values + [fill] * (width - len(values))

        input_ids = [padded(r["ids"], protocol.PAD_TOKEN) for r in rows] + [[protocol.PAD_TOKEN] * width] * pad_rows
        position_ids = [padded(r["positions"], 0) for r in rows] + [[0] * width] * pad_rows
        # NxDI writes no KV for slot -1.
        slot_mapping = [padded([-1 if s == protocol.PAD_SLOT else s for s in r["slots"]], -1) for r in rows]
        slot_mapping += [[-1] * width] * pad_rows
        block_table = [r["blocks"] + [0] * (blocks - len(r["blocks"])) for r in rows] + [[0] * blocks] * pad_rows
        full = [r["context_len"] for r in rows] + [0] * pad_rows
        computed = [r["context_len"] - len(r["ids"]) for r in rows] + [0] * pad_rows
        attention_mask = [[1 if j < len(r["ids"]) else 0 for j in range(width)] for r in rows]
        attention_mask += [[0] * width] * pad_rows
        # Per row: top_k, top_p, temperature (greedy is top_k 1).
        sampling = [[float(r["top_k"]), float(r["top_p"]), float(r["temperature"])] for r in rows]
        sampling += [[1.0, 1.0, 1.0]] * pad_rows
        seq_ids = list(range(batch))
        out = self.model(
            input_ids=torch.tensor(input_ids, dtype=torch.int32),
            attention_mask=torch.tensor(attention_mask, dtype=torch.int32),
            position_ids=torch.tensor(position_ids, dtype=torch.int32),
            seq_ids=torch.tensor(seq_ids, dtype=torch.int32),
            sampling_params=torch.tensor(sampling, dtype=torch.float32),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int32),
            block_table=torch.tensor(block_table, dtype=torch.int32),
            full_context_lens=torch.tensor(full, dtype=torch.int32),
            computed_context_lens=torch.tensor(computed, dtype=torch.int32),
        )
        # With on-device sampling the output holds token ids, one per row
        # (for the last real position of each row).
        ids = out.logits if hasattr(out, "logits") else out
        return [int(t) for t in ids.reshape(batch, -1)[: len(rows), -1].tolist()]


def rows_of(step, params):
    """The real sequences of a checked padded step, as NxdiModel.run takes them."""
    qs, width = step["query_start"], step["max_blocks_per_seq"]
    sampled = set(step["logits_rows"])
    rows = []
    for s, sid in enumerate(step["seq_ids"]):
        a, b = qs[s], qs[s + 1]
        p = params[sid]
        greedy = p["temperature"] == 0 or p.get("top_k") == 1
        rows.append({
            "ids": step["token_ids"][a:b],
            "positions": step["positions"][a:b],
            "slots": step["slot_mapping"][a:b],
            "blocks": step["block_tables"][s * width:(s + 1) * width],
            "context_len": step["context_lens"][s],
            "sample": (b - 1) in sampled,
            "top_k": 1 if greedy else (p.get("top_k") or 0),
            "top_p": p.get("top_p", 1.0),
            "temperature": 1.0 if greedy else p["temperature"],
        })
    return rows


def make_step(model, compiled):
    buckets = {"batch_sizes": compiled["batch_sizes"], "token_counts": compiled["token_counts"]}
    global_top_k = compiled["max_top_k"]
    params = {}

    def run_step(step):
        for sid in step.get("finished", []):
            params.pop(sid, None)
        protocol.check_step(step, buckets)
        for started in step.get("started", []):
            params[started["id"]] = started["params"]
        for sid in step["seq_ids"]:
            if sid not in params:
                raise ValueError(f"{sid} was never started")
        rows = rows_of(step, params)
        for row in rows:
            row["top_k"] = min(row["top_k"] or global_top_k, global_top_k)
        try:
            return model.run(rows, step["phase"])
        except Exception as e:  # noqa: BLE001
            status = hardware_status(e)
            if status is not None:
                raise protocol.HardwareError(f"Neuron runtime status {status}: {e}") from e
            raise

    return run_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--model-dir", required=True, help="compile.py's output")
    ap.add_argument("--model", required=True, help="the Hugging Face model folder (config, tokenizer)")
    args = ap.parse_args()
    os.environ.setdefault("NEURON_RT_EXEC_TIMEOUT", "30")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    rf, wf = sock.makefile("rb"), sock.makefile("wb")
    with open(os.path.join(args.model_dir, protocol.COMPILED_FILE)) as f:
        compiled = json.load(f)
    # Loaded before hello is answered: inferd waits --neuron-load-timeout
    # for the manifest, and steps then run under --neuron-step-timeout.
    model = NxdiModel(args.model_dir, compiled)
    try:
        protocol.serve(rf, wf, protocol.manifest_from_compiled(compiled), make_step(model, compiled))
    except protocol.ProtocolError as e:
        print(f"neuron worker: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
