#!/usr/bin/env python3
"""Side-by-side table of `dtl bench --json` and the PyTorch reference (`bench_dtl_train.py --json`).

  python3 bench/reference/compare.py --dtl DTL.json [--dtl DTL2.json ...] --ref REF.jsonl [--ref ...] \\
      [--card "NVIDIA H100 80GB HBM3"] [--precision fp32|bf16]

Inputs:
  --dtl   the JSON object that `dtl bench <pipeline> --what train --json` prints:
          {"backbone", "device", "image_size", "rows": [{"what", "side", "batch", "img_per_s",
          "peak_rss_mib", "peak_gpu_mib", "gpu_driver_mib" (optional), "trainable_params"}, ...]};
          repeat --dtl for several runs
          (for instance one per batch size)
  --ref   JSON lines appended by `bench_dtl_train.py --json`: {"method", "model", "batch",
          "device", "precision", "img_per_s", "peak_mib", "steps", "warmup", and optionally
          "setting" (official | best), "compile", "error"}; repeatable. A row with "error" is a
          failed measurement: listed under the table with its reason, never compared

Rows are matched by (method, batch): dtl side "dtl" is method "dtl", "dtl+" is "dtlplus" ("dtl+"
is accepted in reference files too), "linear" is "linear". A reference row is only compared
with a dtl run of the same model (dtl's "backbone") and device kind (cpu or cuda), where both
files name them. One table row per dtl row and reference precision:

  speed ratio    dtl img/s / PyTorch img/s (above 1: dtl is faster)
  memory ratio   dtl peak MiB / PyTorch peak MiB (below 1: dtl needs less)
  PyTorch reserved MiB, dtl / reserved   when the reference rows carry peak_reserved_mib
                 (torch.cuda.max_memory_reserved): the allocator's held memory, and dtl's peak
                 over it

dtl's peak is peak_gpu_mib when the row has one, else peak_rss_mib (marked "RSS"); the
reference's is torch.cuda.max_memory_allocated on CUDA and ru_maxrss (marked "RSS") on the CPU.
Rows without a partner are listed under the table, never dropped. When a file holds the same
(method, batch, precision) twice, the later row is used and the replacement is reported.

Exit status: 0 when at least one pair was compared, 1 when none was, 2 on bad input.
"""

import argparse
import json
import os
import re
import sys

SIDE_TO_METHOD = {"dtl": "dtl", "dtl+": "dtlplus", "linear": "linear"}
METHOD_ALIASES = {"dtl": "dtl", "dtlplus": "dtlplus", "dtl+": "dtlplus", "linear": "linear"}
METHOD_ORDER = {"dtl": 0, "dtlplus": 1, "linear": 2}
PRECISION_ORDER = {"fp32": 0, "bf16": 1}
# bench_dtl_train.py --setting: eager (official) or bf16 weights + torch.compile (best)
SETTINGS = ["official", "best"]


class InputError(Exception):
    """Bad input; the message is one line naming the file, row and key."""


def read_text(path):
    if not os.path.exists(path):
        raise InputError("%s: no such file" % path)
    if os.path.isdir(path):
        raise InputError("%s: is a folder, expected a JSON file" % path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError("%s: cannot read it (%s)" % (path, e))


def number(path, where, row, key, allow_none=False):
    if key not in row:
        raise InputError("%s: %s has no \"%s\"" % (path, where, key))
    v = row[key]
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError("%s: %s: \"%s\" must be a number, got %s" % (path, where, key, json.dumps(v)))
    return float(v)


def device_kind(d):
    """`cuda:0` -> `cuda`, `cuda:0 (NVIDIA H200)` -> `cuda`, `cpu (2 threads)` -> `cpu`, None -> None."""
    if d is None:
        return None
    return re.split(r"[:\s(]", str(d).strip(), maxsplit=1)[0]


def load_dtl(path):
    """Parses one `dtl bench --json` output; returns (meta, train rows, other rows)."""
    text = read_text(path).strip()
    if not text:
        raise InputError("%s: empty; expected the JSON object printed by `dtl bench ... --json`" % path)
    try:
        obj = json.loads(text)
    except ValueError as e:
        # Tolerate log lines around the object: parse from the first line that opens one.
        lines = text.splitlines(keepends=True)
        at = next((i for i, l in enumerate(lines) if l.startswith("{")), None)
        if at is None:
            raise InputError("%s: not valid JSON (%s); expected the output of `dtl bench ... --json`" % (path, e))
        try:
            obj, _ = json.JSONDecoder().raw_decode("".join(lines[at:]))
        except ValueError as e2:
            raise InputError("%s: not valid JSON (%s); expected the output of `dtl bench ... --json`" % (path, e2))
    if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
        raise InputError("%s: expected an object with a \"rows\" list (the output of `dtl bench ... --json`)" % path)
    meta = {
        "file": path,
        "backbone": obj.get("backbone"),
        "device": obj.get("device"),
        "image_size": obj.get("image_size"),
        "precision": obj.get("precision"),
    }
    train, other = [], []
    for i, r in enumerate(obj["rows"]):
        where = "rows[%d]" % i
        if not isinstance(r, dict):
            raise InputError("%s: %s is not an object" % (path, where))
        for key in ("what", "side"):
            if not isinstance(r.get(key), str):
                raise InputError("%s: %s: \"%s\" must be a string such as %s" % (
                    path, where, key, "\"train\"" if key == "what" else "\"dtl\""))
        batch = number(path, where, r, "batch")
        ips = number(path, where, r, "img_per_s")
        gpu = number(path, where, r, "peak_gpu_mib", allow_none=True) if "peak_gpu_mib" in r else None
        rss = number(path, where, r, "peak_rss_mib", allow_none=True) if "peak_rss_mib" in r else None
        row = {
            "file": path, "where": where, "what": r["what"], "batch": int(batch),
            # `run.activations` of the row ("recompute" or "store"), shown with the side
            "side": r["side"] + (" (%s)" % r["activations"] if isinstance(r.get("activations"), str) and r["side"] != "linear" else ""),
            "activations": r.get("activations"),
            "img_per_s": ips, "peak": gpu if gpu is not None else rss,
            "peak_kind": "gpu" if gpu is not None else ("rss" if rss is not None else None),
            "method": SIDE_TO_METHOD.get(r["side"]),
            "driver": number(path, where, r, "gpu_driver_mib", allow_none=True) if "gpu_driver_mib" in r else None,
        }
        if r["what"] == "train" and row["method"] is not None:
            train.append(row)
        else:
            other.append(row)
    return meta, train, other


def load_ref(path):
    """Parses reference JSON lines; returns a list of rows."""
    text = read_text(path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = "line %d" % n
        try:
            r = json.loads(line)
        except ValueError as e:
            raise InputError("%s: %s is not valid JSON (%s)" % (path, where, e))
        if not isinstance(r, dict):
            raise InputError("%s: %s is not a JSON object" % (path, where))
        if not isinstance(r.get("method"), str):
            raise InputError("%s: %s has no \"method\" string (dtl, dtlplus or linear)" % (path, where))
        method = METHOD_ALIASES.get(r["method"])
        if method is None:
            raise InputError("%s: %s: method %s is not one of dtl, dtlplus, linear" % (path, where, json.dumps(r["method"])))
        error = r.get("error")
        if error is not None and not isinstance(error, str):
            raise InputError("%s: %s: \"error\" must be a string, got %s" % (path, where, json.dumps(error)))
        setting = r.get("setting", "official")
        if setting not in SETTINGS:
            raise InputError("%s: %s: setting %s is not one of %s" % (
                path, where, json.dumps(setting), ", ".join(SETTINGS)))
        rows.append({
            "file": path, "where": where, "method": method,
            "batch": int(number(path, where, r, "batch")),
            # a failed row (with "error") has null figures
            "img_per_s": number(path, where, r, "img_per_s", allow_none=error is not None),
            "peak": number(path, where, r, "peak_mib", allow_none=True),
            "reserved": number(path, where, r, "peak_reserved_mib", allow_none=True) if "peak_reserved_mib" in r else None,
            "model": r.get("model"), "device": r.get("device"),
            "precision": r.get("precision", "fp32"),
            "setting": setting, "compile": r.get("compile"), "error": error,
            "torch": r.get("torch") if isinstance(r.get("torch"), str) else None,
        })
    if not rows:
        raise InputError("%s: empty; expected JSON lines written by bench_dtl_train.py --json" % path)
    return rows


def dedupe(rows, key, notes, what):
    """Keeps the last row of each key; notes every replaced one."""
    kept = {}
    for r in rows:
        k = key(r)
        if k in kept:
            old = kept[k]
            notes.append("%s %s:%s replaced by the later %s:%s (same %s)" % (
                what, old["file"], old["where"], r["file"], r["where"], ", ".join(str(x) for x in k)))
        kept[k] = r
    return list(kept.values())


def fmt(v, digits=1):
    if v is None:
        return "-"
    return "{:,.{d}f}".format(v, d=digits)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return "%.2f" % (a / b)


def ref_label(r):
    """A reference row's precision, with " compiled (regional)" and the like for --setting best."""
    if r.get("setting") == "best":
        return "%s compiled (%s)" % (r["precision"], r.get("compile") or "?")
    return r["precision"]


def peak_cell(v, kind):
    return fmt(v, 0) + (" (RSS)" if v is not None and kind == "rss" else "")


def compare(dtl_files, ref_files, card=None, precision=None):
    """Returns (markdown text, number of compared pairs)."""
    metas, train, other, refs, notes = [], [], [], [], []
    for p in dtl_files:
        meta, t, o = load_dtl(p)
        metas.append(meta)
        for r in t + o:
            r["meta"] = meta
        train += t
        other += o
    for p in ref_files:
        refs += load_ref(p)
    train = dedupe(train, lambda r: (r["method"], r["activations"], r["batch"], r["meta"]["backbone"], r["meta"]["device"]), notes, "dtl row")
    refs = dedupe(refs, lambda r: (r["method"], r["batch"], r["precision"], r["setting"], r["compile"], r["model"], r["device"]),
                  notes, "reference row")
    failed = [r for r in refs if r["error"] is not None]
    refs = [r for r in refs if r["error"] is None]

    unmatched = ["reference %s:%s %s batch %d %s: failed (%s)" % (
        r["file"], r["where"], r["method"], r["batch"], ref_label(r), r["error"]) for r in failed]
    if precision:
        kept = []
        for r in refs:
            if r["precision"] == precision:
                kept.append(r)
            else:
                unmatched.append("reference %s:%s %s batch %d %s: left out by --precision %s" % (
                    r["file"], r["where"], r["method"], r["batch"], r["precision"], precision))
        refs = kept

    def compatible(d, r):
        """None when the two can be compared, else why not."""
        m = d["meta"]
        if m["backbone"] and r["model"] and m["backbone"] != r["model"]:
            return "model %s, dtl's backbone is %s" % (r["model"], m["backbone"])
        dk, rk = device_kind(m["device"]), device_kind(r["device"])
        if dk and rk and dk != rk:
            return "device %s, dtl ran on %s" % (r["device"], m["device"])
        return None

    pairs = []
    used = set()
    for d in sorted(train, key=lambda r: (r["batch"], METHOD_ORDER[r["method"]])):
        partners = [r for r in refs if r["method"] == d["method"] and r["batch"] == d["batch"] and compatible(d, r) is None]
        if not partners:
            unmatched.append("dtl %s:%s %s batch %d: no PyTorch row with method %s, batch %d%s" % (
                d["file"], d["where"], d["side"], d["batch"], d["method"], d["batch"],
                " on the same model and device" if refs else ""))
        for r in sorted(partners, key=lambda r: (r["setting"] == "best", PRECISION_ORDER.get(r["precision"], 9))):
            used.add(id(r))
            pairs.append((d, r))
    for r in refs:
        if id(r) in used:
            continue
        why = [compatible(d, r) for d in train if d["method"] == r["method"] and d["batch"] == r["batch"]]
        reason = next((w for w in why if w), "no dtl row with side %s, batch %d" % (
            {v: k for k, v in SIDE_TO_METHOD.items()}[r["method"]], r["batch"]))
        unmatched.append("reference %s:%s %s batch %d %s: %s" % (
            r["file"], r["where"], r["method"], r["batch"], ref_label(r), reason))
    for o in other:
        reason = ("no PyTorch counterpart in the reference" if o["what"] == "train"
                  else "the reference measures training steps only")
        unmatched.append("dtl %s:%s what=%s side=%s batch %d (%s img/s): %s" % (
            o["file"], o["where"], o["what"], o["side"], o["batch"], fmt(o["img_per_s"]), reason))

    out = []
    title = "## dtl vs PyTorch, training steps"
    if card:
        title += " on %s" % card
    out.append(title)
    out.append("")
    for m in metas:
        out.append("- dtl: `%s` (%s, %s, image %s, precision %s)" % (
            m["file"], m["backbone"] or "backbone not named", m["device"] or "device not named",
            m["image_size"] if m["image_size"] is not None else "?",
            m["precision"] or "not named: f32 unless the pipeline set run.precision"))
    models = sorted({(r["model"] or "?", r["device"] or "?") for r in refs})
    for f in ref_files:
        out.append("- PyTorch: `%s`" % f)
    if models:
        out.append("- PyTorch model and device: %s" % ", ".join("%s on %s" % m for m in models))
    out.append("- speed ratio = dtl img/s / PyTorch img/s (above 1: dtl faster); memory ratio = dtl peak / "
               "PyTorch peak (below 1: dtl needs less); peaks are GPU allocations unless marked RSS")
    out.append("")
    reserved = any(r["reserved"] is not None for _, r in pairs)
    head = ["method", "batch", "PyTorch precision", "dtl img/s", "PyTorch img/s", "speed ratio",
            "dtl peak MiB", "PyTorch peak MiB", "memory ratio"]
    if reserved:
        head += ["PyTorch reserved MiB", "dtl / reserved"]
    driver = any(d.get("driver") is not None for d, _ in pairs)
    if driver:
        head += ["dtl driver MiB"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for d, r in pairs:
        rkind = "rss" if device_kind(r["device"]) == "cpu" else "gpu"
        cells = [d["method"], str(d["batch"]), ref_label(r), fmt(d["img_per_s"]), fmt(r["img_per_s"]),
                 ratio(d["img_per_s"], r["img_per_s"]), peak_cell(d["peak"], d["peak_kind"]),
                 peak_cell(r["peak"], rkind), ratio(d["peak"], r["peak"])]
        if reserved:
            cells += [fmt(r["reserved"], 0), ratio(d["peak"], r["reserved"])]
        if driver:
            cells += [fmt(d.get("driver"), 0)]
        out.append("| " + " | ".join(cells) + " |")
    if not pairs:
        out.append("| (no pair matched) |" + " |" * (len(head) - 1))
    mixed = {(d["peak_kind"], "rss" if device_kind(r["device"]) == "cpu" else "gpu") for d, r in pairs}
    if reserved:
        out.append("")
        out.append("PyTorch peak is torch.cuda.max_memory_allocated (live tensors); PyTorch reserved is "
                   "max_memory_reserved (the caching allocator's blocks, freed ones included). dtl's peak is "
                   "the most its live device buffers held (workspaces included), the counterpart of "
                   "max_memory_allocated; dtl driver MiB, where shown, is the driver's used-memory growth "
                   "since the device was opened.")
    if any(a != b for a, b in mixed):
        out.append("")
        out.append("Note: some memory ratios compare a process RSS with a GPU allocation peak; they are not like for like.")
    elif ("rss", "rss") in mixed:
        out.append("")
        out.append("Note: a process RSS includes the program's own libraries (several hundred MiB for PyTorch), "
                   "so RSS ratios do not measure training memory alone.")
    if unmatched:
        out.append("")
        out.append("Unmatched rows (%d):" % len(unmatched))
        out.extend("- " + u for u in unmatched)
    if notes:
        out.append("")
        out.append("Replaced duplicates (%d):" % len(notes))
        out.extend("- " + n for n in notes)
    return "\n".join(out) + "\n", len(pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtl", action="append", required=True, metavar="JSON", help="output of `dtl bench ... --json` (repeatable)")
    ap.add_argument("--ref", action="append", required=True, metavar="JSONL", help="bench_dtl_train.py --json output (repeatable)")
    ap.add_argument("--card", help="the device's name, printed in the title")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="compare with these reference rows only")
    args = ap.parse_args(argv)
    try:
        text, n = compare(args.dtl, args.ref, args.card, args.precision)
    except InputError as e:
        print("compare.py: error: %s" % e, file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
