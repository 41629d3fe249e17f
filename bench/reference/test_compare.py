#!/usr/bin/env python3
"""Tests of compare.py on the sample files in testdata/ (standard library only).

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

DATA = os.path.join(HERE, "testdata")
B32 = os.path.join(DATA, "dtl-bench-cuda-b32.json")
B128 = os.path.join(DATA, "dtl-bench-cuda-b128.json")
REF = os.path.join(DATA, "ref-cuda.jsonl")


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

    def test_cpu_sample(self):
        text, n = compare.compare([os.path.join(DATA, "dtl-bench-cpu.json")], [os.path.join(DATA, "ref-cpu.jsonl")])
        self.assertEqual(n, 3)
        self.assertNotIn("reserved", text)
        self.assertTrue(all(r[6].endswith("(RSS)") and r[7].endswith("(RSS)") for r in table_rows(text)))


if __name__ == "__main__":
    unittest.main()
