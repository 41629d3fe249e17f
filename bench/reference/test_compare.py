#!/usr/bin/env python3
"""Tests of compare.py and gpu_table.py on the sample files in testdata/ (standard library only).

  python3 bench/reference/test_compare.py
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402
import gpu_table  # noqa: E402

DATA = os.path.join(HERE, "testdata")
B32 = os.path.join(DATA, "dtl-bench-cuda-b32.json")
B128 = os.path.join(DATA, "dtl-bench-cuda-b128.json")
REF = os.path.join(DATA, "ref-cuda.jsonl")
GPU = os.path.join(DATA, "gpu")
STATUS = os.path.join(GPU, "status.jsonl")
GPU_REF = os.path.join(GPU, "ref.jsonl")


def table_rows(text):
    """The data rows of the markdown table, as lists of cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method") and "no pair matched" not in line:
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def read(path):
    with open(path) as f:
        return f.read()


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = compare.main(argv)
    return code, out.getvalue(), err.getvalue()


class CompareTest(unittest.TestCase):
    def test_driver_column_when_dtl_rows_carry_it(self):
        d = json.loads(read(B32))
        for i, r in enumerate(d["rows"]):
            r["gpu_driver_mib"] = 1000.0 + i
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "b32.json")
            with open(path, "w") as f:
                json.dump(d, f)
            text, n = compare.compare([path], [REF])
        self.assertGreater(n, 0)
        header = next(l for l in text.splitlines() if l.startswith("| method"))
        self.assertTrue(header.rstrip(" |").endswith("dtl driver MiB"), header)
        self.assertTrue(all(r[-1].startswith("1,00") for r in table_rows(text)), text)
        plain, _ = compare.compare([B32], [REF])
        plain_header = next(l for l in plain.splitlines() if l.startswith("| method"))
        self.assertNotIn("driver MiB", plain_header)

    def test_pairs_and_ratios(self):
        text, n = compare.compare([B32, B128], [REF], card="Test Card")
        rows = table_rows(text)
        self.assertEqual(n, 6)
        self.assertEqual(len(rows), 6)
        self.assertIn("on Test Card", text.splitlines()[0])
        by = {(r[0], r[1], r[2]): r for r in rows}
        # method, batch, precision -> speed ratio, memory ratio
        self.assertEqual(by[("dtl", "32", "fp32")][5], "0.50")
        self.assertEqual(by[("dtl", "32", "fp32")][8], "0.50")
        self.assertEqual(by[("dtl", "32", "bf16")][5], "0.20")
        self.assertEqual(by[("dtl", "32", "bf16")][8], "0.80")
        self.assertEqual(by[("linear", "32", "fp32")][8], "1.00")
        # fp32 is listed before bf16 for the same method and batch
        self.assertLess(rows.index(by[("dtl", "32", "fp32")]), rows.index(by[("dtl", "32", "bf16")]))
        # the later of two duplicate reference rows wins (1200 img/s, not 999)
        self.assertEqual(by[("dtl", "128", "fp32")][4], "1,200.0")
        self.assertIn("Replaced duplicates (1)", text)
        # a row without peak_gpu_mib falls back to its RSS peak, marked as such
        self.assertEqual(by[("dtlplus", "128", "fp32")][6], "950 (RSS)")
        self.assertIn("not like for like", text)
        # the allocator's reserved peak, where the reference row has one
        self.assertEqual(len(rows[0]), 11)
        self.assertEqual(by[("dtl", "32", "fp32")][9], "2,500")
        self.assertEqual(by[("dtl", "32", "fp32")][10], "0.40")
        self.assertEqual(by[("dtl", "32", "bf16")][9], "-")

    def test_unmatched_rows_are_listed(self):
        text, _ = compare.compare([B32, B128], [REF])
        section = text.split("Unmatched rows (4):\n", 1)[1].split("\n\n", 1)[0]
        unmatched = section.splitlines()
        self.assertEqual(len(unmatched), 4)
        joined = "\n".join(unmatched)
        self.assertIn("naive-autodiff", joined)
        self.assertIn("linear batch 128", joined)
        self.assertIn("dtl batch 64", joined)
        self.assertIn("model vit_tiny_patch16_224", joined)

    def test_precision_filter(self):
        text, n = compare.compare([B32, B128], [REF], precision="bf16")
        self.assertEqual(n, 1)
        self.assertIn("left out by --precision bf16", text)

    def test_device_mismatch_matches_nothing(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "cpu.json")
            obj = json.loads(read(B32))
            obj["device"] = "cpu"
            with open(p, "w") as f:
                json.dump(obj, f)
            code, out, _ = run_main(["--dtl", p, "--ref", REF])
        self.assertEqual(code, 1)
        self.assertEqual(table_rows(out), [])
        self.assertIn("device cuda, dtl ran on cpu", out)

    def test_log_lines_around_the_json(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "noisy.json")
            with open(p, "w") as f:
                f.write("dtl: building vit_base_patch16_224\n" + read(B32) + "done\n")
            text, n = compare.compare([p], [REF])
        self.assertEqual(n, 4)

    def test_missing_file_is_one_line_error(self):
        code, out, err = run_main(["--dtl", os.path.join(DATA, "absent.json"), "--ref", REF])
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("absent.json: no such file", err)

    def test_bad_rows_name_file_and_key(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "ref.jsonl")
            with open(p, "w") as f:
                f.write('{"method": "dtl", "batch": 32, "img_per_s": "fast", "peak_mib": 1}\n')
            code, _, err = run_main(["--dtl", B32, "--ref", p])
            self.assertEqual(code, 2)
            self.assertIn("ref.jsonl: line 1: \"img_per_s\" must be a number", err)
            with open(p, "w") as f:
                f.write('{"method": "lora", "batch": 32, "img_per_s": 1, "peak_mib": 1}\n')
            code, _, err = run_main(["--dtl", B32, "--ref", p])
            self.assertEqual(code, 2)
            self.assertIn("method \"lora\" is not one of dtl, dtlplus, linear", err)

    def test_device_kind_reads_described_devices(self):
        self.assertEqual(compare.device_kind("cuda:0 (NVIDIA H200)"), "cuda")
        self.assertEqual(compare.device_kind("cpu (2 threads)"), "cpu")
        self.assertEqual(compare.device_kind("cuda"), "cuda")
        self.assertIsNone(compare.device_kind(None))

    def test_cpu_sample(self):
        text, n = compare.compare([os.path.join(DATA, "dtl-bench-cpu.json")], [os.path.join(DATA, "ref-cpu.jsonl")])
        self.assertEqual(n, 3)
        self.assertNotIn("reserved", text)
        self.assertTrue(all(r[6].endswith("(RSS)") and r[7].endswith("(RSS)") for r in table_rows(text)))


def gpu_rows(status=STATUS, refs=None):
    """The rows gpu_table builds from a status file, keyed (method, batch, label, activations)."""
    phases = gpu_table.read_status(status)
    files = refs if refs is not None else [p["file"] for p in phases if p["phase"] == "pytorch"]
    rows, notes, _ = gpu_table.build(phases, [], files)
    return {(r["method"], r["batch"], r["label"], r["activations"]): r for r in rows}, rows, notes


class GpuTableTest(unittest.TestCase):
    def test_rows_ratios_and_the_fastest_best(self):
        by, rows, _ = gpu_rows()
        self.assertEqual(len(rows), 14)
        r = by[("dtl", 32, "bf16", "recompute")]
        self.assertAlmostEqual(r["x_eager"], 4000 / 2500)
        self.assertAlmostEqual(r["x_best"], 4000 / 2600)
        self.assertAlmostEqual(r["peak_over_eager"], 450 / 1340)
        self.assertEqual((r["graph"], r["precision"], r["dtl_driver_mib"]), ("captured", "bf16", 700.0))
        # of the two best rows at batch 128 (regional 6,000, full 6,400) the faster counts
        r = by[("dtl", 128, "bf16", "recompute")]
        self.assertEqual((r["best_img_per_s"], r["best_compile"]), (6400.0, "full"))
        # the row's own precision when the file's top level has none
        self.assertEqual(r["precision"], "bf16")

    def test_targets_met_and_missed(self):
        by, _, _ = gpu_rows()
        t = by[("dtl", 32, "bf16", "recompute")]["targets"]
        self.assertEqual(t, {"peak <= 0.35x eager": "met", ">= 1.5x eager img/s": "met", "> best img/s": "met",
                             "peak <= 470 MiB": "met", ">= 3,800 img/s": "met"})
        t = by[("dtl", 32, "bf16", "store")]["targets"]
        self.assertEqual((t["peak <= 0.35x eager"], t["peak <= 470 MiB"]), ("missed", "missed"))
        t = by[("dtl", 128, "bf16", "recompute")]["targets"]
        self.assertEqual(t, {"peak <= 0.35x eager": "met", ">= 1.5x eager img/s": "missed", "> best img/s": "met",
                             ">= 6,700 img/s": "missed"})
        # absolute targets are DTL's alone; a failed best leaves its target unknown
        t = by[("dtlplus", 32, "bf16", "recompute")]["targets"]
        self.assertEqual(t, {"peak <= 0.35x eager": "missed", ">= 1.5x eager img/s": "missed", "> best img/s": "-"})
        self.assertEqual(by[("dtlplus", 128, "bf16", "recompute")]["targets"]["> best img/s"], "missed")

    def test_failed_phases_and_missing_rows_are_shown(self):
        by, _, notes = gpu_rows()
        for a in ("recompute", "store"):
            r = by[("dtl", 128, "bf16, DTL_GRAPHS=0", a)]
            self.assertEqual((r["dtl_img_per_s"], r["dtl_error"], r["targets"]), (None, "timed out after 40 s", {}))
        self.assertNotIn(("dtlplus", 128, "bf16, DTL_GRAPHS=0", "recompute"), by)
        self.assertEqual(by[("dtlplus", 128, "bf16", "store")]["dtl_error"], "row missing from the output")
        self.assertEqual(by[("dtlplus", 32, "bf16", "recompute")]["best_error"],
                         "compile: BackendCompilerFailed: an invented failure")
        r = by[("linear", 128, "bf16", None)]
        self.assertEqual((r["eager_error"], r["x_eager"], r["targets"]["peak <= 0.35x eager"]), ("missing", None, "-"))
        self.assertIn("PyTorch phase (ref.jsonl): timed out after 150 s", notes)
        rows, notes, versions = gpu_table.build(gpu_table.read_status(STATUS), [], [GPU_REF])
        self.assertEqual(versions, ["2.11.0+cu130"])
        text = gpu_table.markdown(rows, notes, card="Test Card", versions=versions)
        self.assertIn("eager: PyTorch 2.11.0+cu130 eager", text)
        self.assertIn("on Test Card", text.splitlines()[0])
        self.assertIn("| FAILED: timed out after 40 s |", text)
        self.assertIn("| 12,000 | missing | missing |", text)
        self.assertIn("3 of 14 dtl rows failed or did not run", text)
        # the fused-attention phase shows DTL rows only, with the attention the file reports
        self.assertIn("bf16, recompute, graph captured, attention fused |", text)

    def test_a_phase_that_wrote_garbage_is_a_failed_row(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "bad.json"), "w") as f:
                f.write("thread 'main' panicked\n")
            with open(os.path.join(d, "status.jsonl"), "w") as f:
                f.write(json.dumps({"phase": "dtl", "label": "f32", "batch": 32, "file": "bad.json", "ok": True,
                                    "methods": ["linear"]}) + "\n")
            by, rows, _ = gpu_rows(os.path.join(d, "status.jsonl"), [GPU_REF])
            self.assertEqual(len(rows), 1)
            self.assertIn("unreadable output", rows[0]["dtl_error"])
            code, out, _ = run_gpu_table(["--status", os.path.join(d, "status.jsonl")])
            self.assertEqual(code, 1)
            self.assertIn("FAILED: unreadable output", out)

    def test_a_precision_other_than_the_one_asked_for_is_shown(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "status.jsonl"), "w") as f:
                f.write(json.dumps({"phase": "dtl", "label": "f32", "precision": "f32", "batch": 32, "ok": True,
                                    "file": os.path.join(GPU, "dtl-bf16-b32.json"), "methods": ["dtl"]}) + "\n")
            _, rows, _ = gpu_rows(os.path.join(d, "status.jsonl"), [GPU_REF])
        self.assertEqual(rows[0]["setting"], "bf16 (asked for f32), recompute, graph captured")

    def test_outputs_and_docs(self):
        with tempfile.TemporaryDirectory() as d:
            doc = os.path.join(d, "benchmarks.md")
            with open(doc, "w") as f:
                f.write("# B\n\nbefore\n%s\nold table\n%s\nafter\n" % (gpu_table.DOCS_BEGIN, gpu_table.DOCS_END))
            md, jl = os.path.join(d, "t.md"), os.path.join(d, "rows.jsonl")
            argv = ["--status", STATUS, "--card", "Test Card", "--when", "then", "--out-md", md, "--out-jsonl", jl,
                    "--write-docs", doc]
            code, out, err = run_gpu_table(argv)
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(read(md), out)
            text = read(doc)
            self.assertNotIn("old table", text)
            self.assertTrue(text.startswith("# B\n\nbefore\n"))
            self.assertTrue(text.endswith("%s\nafter\n" % gpu_table.DOCS_END))
            self.assertIn(out.rstrip("\n"), text)
            # writing twice gives the same document
            run_gpu_table(argv)
            self.assertEqual(read(doc), text)
            rows = [json.loads(l) for l in read(jl).splitlines()]
            self.assertEqual(len(rows), 14)
            self.assertEqual(rows[0]["card"], "Test Card")
            self.assertEqual(rows[0]["targets"][">= 3,800 img/s"], "met")
            with open(doc, "w") as f:
                f.write("# no markers\n")
            code, _, err = run_gpu_table(argv)
            self.assertEqual(code, 2)
            self.assertIn("benchmarks.md: no table markers", err)

    def test_plain_dtl_files_without_a_status(self):
        code, out, _ = run_gpu_table(["--dtl", "bf16=" + os.path.join(GPU, "dtl-bf16-b32.json"), "--ref", GPU_REF])
        self.assertEqual(code, 0)
        self.assertEqual(len(table_rows(out)), 5)
        code, _, err = run_gpu_table(["--ref", GPU_REF])
        self.assertEqual(code, 2)
        self.assertIn("--status", err)

    def test_the_run_line_names_card_and_time(self):
        code, out, _ = run_gpu_table(["--status", STATUS])
        self.assertEqual(code, 0)
        self.assertIn("training steps on Status Card", out.splitlines()[0])
        self.assertIn("Measured 2026-01-02 03:04 UTC", out)
        code, out, _ = run_gpu_table(["--status", STATUS, "--card", "Other"])
        self.assertIn("training steps on Other", out.splitlines()[0])

    def test_compare_labels_best_rows_and_lists_failed_ones(self):
        text, n = compare.compare([os.path.join(GPU, "dtl-bf16-b32.json")], [GPU_REF])
        self.assertIn("bf16 compiled (regional)", text)
        self.assertIn("dtlplus batch 32 bf16 compiled (regional): failed (compile: BackendCompilerFailed", text)
        # 2 dtl and 2 dtl+ rows with eager, the dtl ones with best too; linear with eager and best
        self.assertEqual(n, 2 * 2 + 2 * 1 + 2)


def run_gpu_table(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = gpu_table.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


if __name__ == "__main__":
    unittest.main()
