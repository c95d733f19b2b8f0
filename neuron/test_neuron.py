"""Tests of the Neuron worker's host side and the compile script's plan,
without the Neuron SDK (make test runs them: python3 -m unittest in neuron/)."""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest

import compile as compile_script
import protocol
import worker

BUCKETS = {"batch_sizes": [4], "token_counts": [8, 16]}


def padded_step(phase, seqs, shape, started=()):
    """seqs: (id, tokens, first position, blocks); block size 4."""
    batch, tokens = shape
    step = {"phase": phase, "shape": {"batch": batch, "tokens": tokens}, "seq_ids": [], "token_ids": [],
            "positions": [], "slot_mapping": [], "query_start": [0], "context_lens": [], "block_tables": [],
            "max_blocks_per_seq": 2, "logits_rows": [], "started": [], "preempted": [], "finished": []}
    for sid, ids, first, blocks in seqs:
        step["seq_ids"].append(sid)
        step["token_ids"] += ids
        step["positions"] += list(range(first, first + len(ids)))
        step["slot_mapping"] += [blocks[p // 4] * 4 + p % 4 for p in range(first, first + len(ids))]
        step["query_start"].append(len(step["token_ids"]))
        step["context_lens"].append(first + len(ids))
        step["block_tables"] += blocks + [0] * (2 - len(blocks))
        step["logits_rows"].append(len(step["token_ids"]) - 1)
    used = len(step["token_ids"])
    step["token_ids"] += [protocol.PAD_TOKEN] * (tokens - used)
    step["positions"] += [0] * (tokens - used)
    step["slot_mapping"] += [protocol.PAD_SLOT] * (tokens - used)
    step["query_start"] += [used] * (batch - len(seqs))
    step["context_lens"] += [0] * (batch - len(seqs))
    step["block_tables"] += [0] * (2 * (batch - len(seqs)))
    for sid, params in started:
        step["started"].append({"id": sid, "prompt_len": 1, "params": params})
    return step


class FakeModel:
    """Records what the worker would hand NxDI; answers token 7 per row."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def run(self, rows, phase):
        if self.fail:
            raise self.fail
        self.calls.append((phase, rows))
        return [7 for r in rows if r["sample"]]


class WorkerTest(unittest.TestCase):
    def compiled(self):
        return {**BUCKETS, "max_top_k": 50}

    def test_rows_carry_each_sequences_slice_and_sampling(self):
        model = FakeModel()
        run = worker.make_step(model, self.compiled())
        greedy = {"temperature": 0.0, "top_p": 1.0, "top_k": None}
        warm = {"temperature": 0.7, "top_p": 0.9, "top_k": None}
        step = padded_step("prefill", [(1, [5, 6, 7], 0, [2]), (2, [8, 9], 0, [3])], (4, 8),
                           started=[(1, greedy), (2, warm)])
        self.assertEqual(run(step), [7, 7])
        phase, rows = model.calls[0]
        self.assertEqual(phase, "prefill")
        self.assertEqual(rows[0]["ids"], [5, 6, 7])
        self.assertEqual(rows[1]["slots"], [12, 13])
        self.assertEqual(rows[1]["blocks"], [3, 0])
        self.assertEqual((rows[0]["top_k"], rows[0]["temperature"]), (1, 1.0), "greedy is top-k 1")
        self.assertEqual((rows[1]["top_k"], rows[1]["top_p"]), (50, 0.9), "the global top-k applies")

    def test_steps_off_the_buckets_or_unstarted_are_refused(self):
        run = worker.make_step(FakeModel(), self.compiled())
        with self.assertRaisesRegex(ValueError, "not a compiled bucket"):
            run(padded_step("prefill", [(1, [5], 0, [2])], (2, 8)))
        with self.assertRaisesRegex(ValueError, "never started"):
            run(padded_step("decode", [(1, [5], 3, [2])], (4, 8)))

    def test_hardware_status_codes_become_hardware_failures(self):
        self.assertEqual(worker.hardware_status("nrt_execute failed: status=1202"), 1202)
        self.assertIsNone(worker.hardware_status("status=1002 (bad input)"))
        run = worker.make_step(FakeModel(fail=RuntimeError("NRT_STATUS 1201")), self.compiled())
        step = padded_step("prefill", [(1, [5], 0, [2])], (4, 8), started=[(1, {"temperature": 0.0})])
        with self.assertRaises(protocol.HardwareError):
            run(step)


class CompileTest(unittest.TestCase):
    def test_dry_run_writes_buckets_that_match_the_server_flags(self):
        with tempfile.TemporaryDirectory() as d:
            model, out = os.path.join(d, "hf"), os.path.join(d, "out")
            os.makedirs(model)
            with open(os.path.join(model, "config.json"), "w") as f:
                json.dump({"vocab_size": 1000}, f)
            done = subprocess.run(
                [sys.executable, compile_script.__file__, "--model", model, "--output", out, "--dry-run",
                 "--max-num-seqs", "4", "--max-num-batched-tokens", "512", "--max-model-len", "1024"],
                capture_output=True, text=True, check=True)
            neuron_config = json.loads(done.stdout)
            with open(os.path.join(out, protocol.COMPILED_FILE)) as f:
                compiled = json.load(f)
        self.assertEqual(neuron_config["context_encoding_buckets"], [128, 256, 512])
        self.assertTrue(neuron_config["is_block_kv_layout"] and neuron_config["is_prefix_caching"])
        self.assertEqual(compiled["token_counts"], [128, 256, 512])
        self.assertEqual(compiled["batch_sizes"], [4])
        self.assertEqual(compiled["num_blocks"], 4 * 1024 // 32)
        self.assertEqual(protocol.manifest_from_compiled(compiled)["capabilities"]["device_sampling"],
                         {"max_top_k": 256})

    def test_flags_that_cannot_compile_are_refused(self):
        err = io.StringIO()
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(err):
            compile_script.main(["--model", "m", "--output", "o", "--max-num-batched-tokens", "4096",
                                 "--max-model-len", "1024"])
        self.assertIn("cannot exceed --max-model-len", err.getvalue())


if __name__ == "__main__":
    unittest.main()
