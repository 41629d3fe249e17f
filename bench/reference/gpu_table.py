#!/usr/bin/env python3
"""The GPU check's table: dtl's training steps against PyTorch eager and PyTorch's best, with targets.

  python3 bench/reference/gpu_table.py --status status.jsonl --ref ref.jsonl --card "NVIDIA H200" \\
      [--out-md gpu-table.md] [--out-jsonl gpu-rows.jsonl] [--write-docs docs/benchmarks.md]
  python3 bench/reference/gpu_table.py --dtl bf16=dtl-bf16-b32.json --dtl bf16=dtl-bf16-b128.json \\
      --ref ref.jsonl

Inputs (standard library only; every file is what `scripts/gpu-check.sh`'s run.sh writes):
  --status  JSON lines, one per phase of the check, in the order they ran, after one line for the
            run itself ({"phase": "run", "card": "NVIDIA H200", "when": "2026-12-01 22:00 UTC"},
            which --card and --when override):
            {"phase": "dtl", "label": "bf16", "batch": 128, "file": "dtl-bf16-b128.json",
             "ok": true, "why": null, "methods": ["dtl"] (optional: the rows the table shows),
             "precision": "bf16" (optional)}
            {"phase": "pytorch", "file": "ref.jsonl", "ok": false, "why": "timed out after 150 s"}
            A phase that failed or never ran still gives the table its expected rows, marked
            with why; file names are relative to the status file's folder.
  --dtl     LABEL=FILE or FILE: a `dtl bench --what train --json` output (repeatable), for use
            without --status
  --ref     the JSON lines of `bench_dtl_train.py --json` (repeatable): eager rows are
            "setting": "official" with "precision": "bf16"; best rows are "setting": "best" (the
            fastest of them per method and batch counts, whichever --compile); rows with
            "error" are failures, shown as such

One table row per dtl configuration (method, batch, precision, activations, graph, attention):

  dtl img/s, eager img/s, best img/s   throughput of the training step (img/s)
  x eager, x best                      dtl img/s over eager's and over best's
  dtl peak MiB                         dtl's peak of live device bytes (cuBLAS workspace included)
  dtl driver MiB                       the driver's used-memory growth, beside it
  eager peak MiB, peak / eager         torch.cuda.max_memory_allocated over the timed steps
  targets                              each "met" or "missed" ("-" when a figure is missing):
      peak <= 0.35x eager     every row
      >= 1.5x eager img/s     every row
      > best img/s            every row
      DTL absolute            method dtl only: at batch 32 peak <= 470 MiB and >= 3,800 img/s,
                              at batch 128 >= 6,700 img/s

The absolute DTL targets are 0.35x and 1.5x of the project's own PyTorch 2.11 eager figures on an
H200 (docs/benchmarks.md, "Reference figures"): 0.35 x 1,340 MiB, 1.5 x 2,527 and 1.5 x 4,499 img/s.
Exit status: 0 when at least one row has both a dtl and an eager figure, 1 when none has, 2 on
bad input.
"""

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402
from compare import InputError  # noqa: E402

METHODS = ["dtl", "dtlplus", "linear"]
METHOD_NAMES = {"dtl": "DTL", "dtlplus": "DTL+", "linear": "linear probe"}
SIDES = {"dtl": "dtl", "dtl+": "dtlplus", "linear": "linear"}
# What `dtl bench --what train` measures for each side: dtl and dtl+ with both policies.
ACTIVATIONS = {"dtl": ["recompute", "store"], "dtlplus": ["recompute", "store"], "linear": [None]}
RELATIVE_PEAK = 0.35
RELATIVE_SPEED = 1.5
# method -> batch -> (peak MiB at most, img/s at least); None where there is no target
ABSOLUTE = {"dtl": {32: (470.0, 3800.0), 128: (None, 6700.0)}}
DOCS_BEGIN = "<!-- gpu-table: begin (written by bench/reference/gpu_table.py --write-docs) -->"
DOCS_END = "<!-- gpu-table: end -->"


def read_status(path):
    """The phases of a check run, from its status JSON lines."""
    text = compare.read_text(path)
    phases = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except ValueError as e:
            raise InputError("%s: line %d is not valid JSON (%s)" % (path, n, e))
        if not isinstance(p, dict) or p.get("phase") not in ("dtl", "pytorch", "run"):
            raise InputError("%s: line %d: \"phase\" must be \"run\", \"dtl\" or \"pytorch\"" % (path, n))
        if p["phase"] == "run":
            # the run itself: the card's name and when it started
            phases.append({"phase": "run", "card": p.get("card"), "when": p.get("when")})
            continue
        if p["phase"] == "dtl" and not isinstance(p.get("batch"), int):
            raise InputError("%s: line %d: a dtl phase needs an integer \"batch\"" % (path, n))
        methods = p.get("methods", METHODS)
        if not isinstance(methods, list) or any(m not in METHODS for m in methods):
            raise InputError("%s: line %d: \"methods\" must list some of %s" % (path, n, ", ".join(METHODS)))
        f = p.get("file")
        phases.append({
            "phase": p["phase"], "label": str(p.get("label") or ""), "batch": p.get("batch"),
            "file": os.path.join(os.path.dirname(path), f) if isinstance(f, str) else None,
            "ok": bool(p.get("ok")), "why": p.get("why"), "methods": methods,
            "precision": p.get("precision"),
        })
    return phases


def load_dtl_rows(path, label, precision=None):
    """The training rows of one `dtl bench --json` output, as dicts keyed for the table."""
    text = compare.read_text(path).strip()
    if not text:
        raise InputError("%s: empty; expected the JSON object printed by `dtl bench ... --json`" % path)
    try:
        obj = json.loads(text)
    except ValueError:
        at = text.find("\n{")
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[at + 1:] if at >= 0 else text)
        except ValueError as e:
            raise InputError("%s: not valid JSON (%s); expected the output of `dtl bench ... --json`" % (path, e))
    if not isinstance(obj, dict) or not isinstance(obj.get("rows"), list):
        raise InputError("%s: expected an object with a \"rows\" list (the output of `dtl bench ... --json`)" % path)
    rows = []
    for i, r in enumerate(obj["rows"]):
        where = "rows[%d]" % i
        if not isinstance(r, dict):
            raise InputError("%s: %s is not an object" % (path, where))
        if r.get("what") != "train" or SIDES.get(r.get("side")) is None:
            continue
        method = SIDES[r["side"]]
        gpu = compare.number(path, where, r, "peak_gpu_mib", allow_none=True) if "peak_gpu_mib" in r else None
        rows.append({
            "label": label, "method": method,
            "batch": int(compare.number(path, where, r, "batch")),
            "activations": r.get("activations") if method != "linear" else None,
            "precision": r.get("precision") or obj.get("precision") or precision,
            "asked": precision,
            "graph": r.get("graph", obj.get("graph")),
            "attention": r.get("attention", obj.get("attention")),
            "img_per_s": compare.number(path, where, r, "img_per_s", allow_none=True),
            "peak": gpu,
            "driver": compare.number(path, where, r, "gpu_driver_mib", allow_none=True) if "gpu_driver_mib" in r else None,
            "device": obj.get("device"), "backbone": obj.get("backbone"),
            "file": path, "where": where, "error": None,
        })
    return rows


def expected_rows(label, batch, methods, why, precision=None):
    """Placeholder rows for a dtl phase that produced nothing usable."""
    return [{"label": label, "method": m, "batch": batch, "activations": a, "precision": precision, "asked": precision,
             "graph": None, "attention": None, "img_per_s": None, "peak": None, "driver": None,
             "device": None, "backbone": None, "file": None, "where": None, "error": why}
            for m in methods for a in ACTIVATIONS[m]]


def pick_reference(refs, method, batch):
    """(eager row, best row, [failed rows]) for one method and batch; None where absent."""
    mine = [r for r in refs if r["method"] == method and r["batch"] == batch and compare.device_kind(r["device"]) != "cpu"]
    eager = [r for r in mine if r["setting"] == "official" and r["precision"] == "bf16"]
    best = [r for r in mine if r["setting"] == "best"]
    ok_eager = [r for r in eager if r["error"] is None]
    ok_best = [r for r in best if r["error"] is None]
    e = ok_eager[-1] if ok_eager else (eager[-1] if eager else None)
    b = max(ok_best, key=lambda r: r["img_per_s"]) if ok_best else (best[-1] if best else None)
    return e, b


def verdict(ok):
    """`met`, `missed`, or `-` when it cannot be told."""
    return "-" if ok is None else ("met" if ok else "missed")


def targets(d, eager, best):
    """The targets of one dtl row: {name: True | False | None}."""
    ips, peak = d["img_per_s"], d["peak"]
    e_ips = eager["img_per_s"] if eager and eager["error"] is None else None
    e_peak = eager["peak"] if eager and eager["error"] is None else None
    b_ips = best["img_per_s"] if best and best["error"] is None else None
    t = {
        "peak <= 0.35x eager": None if peak is None or not e_peak else peak <= RELATIVE_PEAK * e_peak,
        ">= 1.5x eager img/s": None if ips is None or not e_ips else ips >= RELATIVE_SPEED * e_ips,
        "> best img/s": None if ips is None or not b_ips else ips > b_ips,
    }
    absolute = ABSOLUTE.get(d["method"], {}).get(d["batch"])
    if absolute:
        mib, speed = absolute
        if mib is not None:
            t["peak <= %s MiB" % compare.fmt(mib, 0)] = None if peak is None else peak <= mib
        if speed is not None:
            t[">= %s img/s" % compare.fmt(speed, 0)] = None if ips is None else ips >= speed
    return t


def setting_cell(d):
    """dtl's configuration of a row: precision, activations, graph, attention."""
    parts = []
    prec, asked = d["precision"], d.get("asked")
    parts.append(prec if prec else "precision ?")
    if asked and prec and asked != prec:
        parts[0] += " (asked for %s)" % asked
    if d["activations"]:
        parts.append(d["activations"])
    g = d["graph"]
    if g is not None:
        parts.append("graph captured" if str(g) == "captured" else "no graph: %s" % g)
    if d["attention"]:
        parts.append("attention " + str(d["attention"]))
    for x in (x.strip() for x in d["label"].split(",")):
        # the phase's label adds what the row does not report itself
        if x and x not in parts and x != asked and not (d["attention"] and x.startswith("DTL_ATTENTION=")):
            parts.append(x)
    return ", ".join(parts)


def ref_figure(img_per_s, error):
    """A PyTorch img/s cell: the figure, FAILED (the notes say why) or missing (no such row)."""
    if error == "missing":
        return "missing"
    if error is not None:
        return "FAILED"
    return compare.fmt(img_per_s, 0)


def build(phases, dtl_inputs, ref_files):
    """The table's rows (dicts) and notes, from the check's phases or plain --dtl inputs."""
    notes = []
    refs = []
    for f in ref_files:
        if os.path.exists(f):
            refs += compare.load_ref(f)
        else:
            notes.append("PyTorch: %s not found" % f)
    dtl = []
    for p in phases:
        if p["phase"] == "run":
            continue
        if p["phase"] == "pytorch":
            if not p["ok"]:
                notes.append("PyTorch phase (%s): %s" % (os.path.basename(p["file"] or "?"), p["why"] or "failed"))
            continue
        rows = []
        why = None if p["ok"] else (p["why"] or "failed")
        if p["file"] and os.path.exists(p["file"]) and p["ok"]:
            try:
                rows = [r for r in load_dtl_rows(p["file"], p["label"], p["precision"]) if r["method"] in p["methods"]]
            except InputError as e:
                why = "unreadable output: %s" % e
        elif why is None:
            why = "no output file"
        got = {(r["method"], r["activations"]) for r in rows}
        missing = [m for m in p["methods"] for a in ACTIVATIONS[m] if (m, a) not in got]
        if rows and missing:
            why = why or "row missing from the output"
        rows += [r for r in expected_rows(p["label"], p["batch"], p["methods"], why, p["precision"])
                 if (r["method"], r["activations"]) not in got]
        dtl += rows
    for label, path in dtl_inputs:
        dtl += load_dtl_rows(path, label)
    order = {m: i for i, m in enumerate(METHODS)}
    labels = []
    for d in dtl:
        if d["label"] not in labels:
            labels.append(d["label"])
    dtl.sort(key=lambda d: (d["batch"], labels.index(d["label"]), order[d["method"]],
                            ["recompute", "store", None].index(d["activations"]) if d["activations"] in ("recompute", "store", None) else 3))
    out = []
    for d in dtl:
        eager, best = pick_reference(refs, d["method"], d["batch"])
        t = targets(d, eager, best) if d["error"] is None else {}
        e_ok = eager is not None and eager["error"] is None
        b_ok = best is not None and best["error"] is None
        out.append({
            "method": d["method"], "batch": d["batch"], "label": d["label"], "setting": setting_cell(d),
            "precision": d["precision"], "activations": d["activations"], "graph": d["graph"],
            "attention": d["attention"], "dtl_img_per_s": d["img_per_s"], "dtl_peak_mib": d["peak"],
            "dtl_driver_mib": d["driver"], "dtl_error": d["error"],
            "eager_img_per_s": eager["img_per_s"] if e_ok else None,
            "eager_peak_mib": eager["peak"] if e_ok else None,
            "eager_error": None if e_ok else (eager["error"] if eager else "missing"),
            "best_img_per_s": best["img_per_s"] if b_ok else None,
            "best_peak_mib": best["peak"] if b_ok else None,
            "best_compile": best.get("compile") if b_ok else None,
            "best_error": None if b_ok else (best["error"] if best else "missing"),
            "x_eager": ratio(d["img_per_s"], eager["img_per_s"]) if e_ok else None,
            "x_best": ratio(d["img_per_s"], best["img_per_s"]) if b_ok else None,
            "peak_over_eager": ratio(d["peak"], eager["peak"]) if e_ok else None,
            "targets": {k: verdict(v) for k, v in t.items()},
        })
    for r in refs:
        if r["error"] is not None:
            notes.append("PyTorch %s batch %d %s: FAILED (%s)" % (r["method"], r["batch"], compare.ref_label(r), r["error"]))
    versions = sorted({r["torch"] for r in refs if r.get("torch")})
    return out, notes, versions


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def num(v, digits=2):
    return "-" if v is None else "%.*f" % (digits, v)


def markdown(rows, notes, card=None, when=None, versions=()):
    """The table as markdown: header, rows, then the notes and the targets' summary."""
    out = ["### dtl vs PyTorch, ViT-B/16 at 224, training steps on %s" % (card or "an unnamed card"), ""]
    if when:
        out.append("Measured %s by `bash .gpu/run.sh` (built by `scripts/gpu-check.sh`)." % when)
        out.append("")
    head = ["method", "batch", "dtl setting", "dtl img/s", "eager img/s", "best img/s", "x eager", "x best",
            "dtl peak MiB", "dtl driver MiB", "eager peak MiB", "peak / eager",
            "peak <= 0.35x eager", ">= 1.5x eager", "> best", "DTL absolute"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    met = missed = unknown = 0
    for r in rows:
        if r["dtl_error"] is not None:
            dtl_cell = "FAILED: %s" % r["dtl_error"]
        else:
            dtl_cell = compare.fmt(r["dtl_img_per_s"], 0)
        t = r["targets"]
        absolute = ", ".join("%s %s" % (k, v) for k, v in t.items() if k not in (
            "peak <= 0.35x eager", ">= 1.5x eager img/s", "> best img/s"))
        best = ref_figure(r["best_img_per_s"], r["best_error"])
        if r["best_error"] is None and r["best_compile"]:
            best += " (%s)" % r["best_compile"]
        eager = ref_figure(r["eager_img_per_s"], r["eager_error"])
        cells = [METHOD_NAMES[r["method"]], str(r["batch"]), r["setting"], dtl_cell, eager, best,
                 num(r["x_eager"]), num(r["x_best"]), compare.fmt(r["dtl_peak_mib"], 0),
                 compare.fmt(r["dtl_driver_mib"], 0), compare.fmt(r["eager_peak_mib"], 0), num(r["peak_over_eager"]),
                 t.get("peak <= 0.35x eager", "-"), t.get(">= 1.5x eager img/s", "-"), t.get("> best img/s", "-"),
                 absolute or "-"]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        for v in t.values():
            met += v == "met"
            missed += v == "missed"
            unknown += v == "-"
    if not rows:
        out.append("| (no dtl row) |" + " |" * (len(head) - 1))
    failed = sum(r["dtl_error"] is not None for r in rows)
    out.append("")
    out.append("Targets: %d met, %d missed, %d not measurable; %d of %d dtl rows failed or did not run." % (
        met, missed, unknown, failed, len(rows)))
    out.append("")
    torch_name = "PyTorch %s" % " / ".join(versions) if versions else "PyTorch"
    out.append("eager: " + torch_name + " eager, f32 weights, bf16 autocast (the method's official code); best: "
               "bf16 frozen weights, bf16 autocast, torch.compile (the compile mode in brackets: regional = "
               "each block compiled once, full = the whole step); both `bench/reference/bench_dtl_train.py`. "
               "Peaks: PyTorch torch.cuda.max_memory_allocated, dtl the peak of its live device buffers "
               "(cuBLAS workspace included), both over the timed steps; dtl driver MiB is the driver's "
               "used-memory growth since dtl opened the device.")
    if notes:
        out.append("")
        out.append("Notes (%d):" % len(notes))
        out.extend("- " + n for n in notes)
    return "\n".join(out) + "\n"


def write_docs(path, text):
    """Replaces what lies between the gpu-table markers of `path` with `text`."""
    doc = compare.read_text(path)
    if DOCS_BEGIN not in doc or DOCS_END not in doc:
        raise InputError("%s: no table markers; it needs the lines\n%s\n%s" % (path, DOCS_BEGIN, DOCS_END))
    a = doc.index(DOCS_BEGIN) + len(DOCS_BEGIN)
    b = doc.index(DOCS_END, a)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc[:a] + "\n\n" + text.rstrip("\n") + "\n\n" + doc[b:])


def parse_dtl(values):
    out = []
    for v in values or []:
        label, sep, path = v.partition("=")
        out.append((label, path) if sep and label and not os.path.exists(v) else ("", v))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--status", metavar="JSONL", help="the phases run.sh wrote (status.jsonl)")
    ap.add_argument("--dtl", action="append", metavar="[LABEL=]JSON", help="a `dtl bench --json` output (repeatable)")
    ap.add_argument("--ref", action="append", default=[], metavar="JSONL", help="bench_dtl_train.py --json output (repeatable)")
    ap.add_argument("--card", help="the card's name, for the title (default: the status file's)")
    ap.add_argument("--when", help="when it was measured, for the line under the title (default: the status file's, else now)")
    ap.add_argument("--out-md", metavar="PATH", help="also write the markdown table here")
    ap.add_argument("--out-jsonl", metavar="PATH", help="write one JSON object per table row here")
    ap.add_argument("--write-docs", metavar="MD", help="put the table between the gpu-table markers of MD")
    args = ap.parse_args(argv)
    if not args.status and not args.dtl:
        ap.error("give --status (the check's phases) or at least one --dtl file")
    try:
        phases = read_status(args.status) if args.status else []
        refs = list(args.ref)
        if args.status and not refs:
            refs = [p["file"] for p in phases if p["phase"] == "pytorch" and p["file"]]
        rows, notes, versions = build(phases, parse_dtl(args.dtl), refs)
        run = next((p for p in phases if p["phase"] == "run"), {})
        card = args.card or run.get("card")
        when = args.when or run.get("when") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = markdown(rows, notes, card, when, versions)
        if args.out_md:
            with open(args.out_md, "w", encoding="utf-8") as f:
                f.write(text)
        if args.out_jsonl:
            with open(args.out_jsonl, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(dict(r, card=card)) + "\n")
        if args.write_docs:
            write_docs(args.write_docs, text)
    except (InputError, OSError) as e:
        print("gpu_table.py: error: %s" % e, file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0 if any(r["dtl_img_per_s"] is not None and r["eager_img_per_s"] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
