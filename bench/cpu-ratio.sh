#!/usr/bin/env bash
# Interleaved CPU training-throughput comparison of `dtl bench` against the PyTorch reference
# (bench/reference/bench_dtl_train.py): the two run in turn (dtl, PyTorch, dtl, PyTorch, ...),
# and the table gives every run, the medians and the ratio of the medians (above 1: dtl faster).
#
#   bench/cpu-ratio.sh [--model vit_tiny_patch16_224] [--batch 8] [--method all|dtl|dtl+|linear]
#                      [--activations both|recompute|store] [--rounds 3] [--steps 5] [--warmup 1]
#                      [--dtl target/release/dtl]
#
# Example: bench/cpu-ratio.sh --model vit_small_patch16_224 --batch 32 --method dtl --rounds 5
#
# The 1-minute load average is printed before every run: on a shared machine, trust a ratio
# only from rounds taken at a load near the benchmark's own two threads. The dtl binary is
# built first (`cargo build --release -p dtl-cli`) unless --dtl names another one.
set -euo pipefail
cd "$(dirname "$0")/.."

model=vit_tiny_patch16_224
batch=8
method=all
activations=both
rounds=3
steps=5
warmup=1
dtl=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model=$2; shift 2 ;;
        --batch) batch=$2; shift 2 ;;
        --method) method=$2; shift 2 ;;
        --activations) activations=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --dtl) dtl=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "cpu-ratio.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$method" in all|dtl|dtl+|linear) ;; *)
    echo "cpu-ratio.sh: --method must be all, dtl, dtl+ or linear, not '$method'" >&2; exit 2 ;;
esac
case "$activations" in both|recompute|store) ;; *)
    echo "cpu-ratio.sh: --activations must be both, recompute or store, not '$activations'" >&2
    exit 2 ;;
esac
if [ -z "$dtl" ]; then
    cargo build --release -q -p dtl-cli
    dtl=target/release/dtl
fi
[ -x "$dtl" ] || { echo "cpu-ratio.sh: no dtl binary at '$dtl'" >&2; exit 2; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pymethod=$method
[ "$method" = all ] && pymethod=all
for r in $(seq 1 "$rounds"); do
    echo "round $r/$rounds: dtl    (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    "$dtl" bench examples/pipelines/bench-vit-tiny-cpu.toml "backbone.kind=$model" --what train \
        --batch "$batch" --steps "$steps" --warmup "$warmup" --json >"$out/dtl.$r.json"
    echo "round $r/$rounds: torch  (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    python3 bench/reference/bench_dtl_train.py --model "$model" --batch "$batch" --steps "$steps" \
        --warmup "$warmup" --method "$pymethod" >"$out/torch.$r.jsonl"
done

python3 - "$out" "$rounds" "$model" "$batch" "$method" "$activations" <<'EOF'
import json, statistics, sys
out, rounds, model, batch, method, acts = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
methods = ["dtl", "dtl+", "linear"] if method == "all" else [method]
modes = ["recompute", "store"] if acts == "both" else [acts]
torch_name = {"dtl": "dtl", "dtl+": "dtlplus", "linear": "linear"}
dtl_runs, torch_runs = {}, {}
for r in range(1, rounds + 1):
    for row in json.load(open(f"{out}/dtl.{r}.json"))["rows"]:
        if row["what"] == "train":
            dtl_runs.setdefault((row["side"], row["activations"]), []).append(row)
    for line in open(f"{out}/torch.{r}.jsonl"):
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            torch_runs.setdefault(rec["method"], []).append(rec["img_per_s"])
def fmt(vals):
    return ", ".join(f"{v:.1f}" for v in vals) + f": **{statistics.median(vals):.1f}**"
print(f"{model}, batch {batch}, {rounds} interleaved rounds (img/s; ratio = dtl median / PyTorch median)")
print("(peak - idle: dtl's resident memory above the frozen weights; a clean figure only for the")
print(" first row each dtl process measures, DTL recompute, as the peak never goes down)")
print()
print("| method | activations | dtl img/s | PyTorch img/s | ratio | dtl peak - idle MiB |")
print("|---|---|---|---|---|---|")
for m in methods:
    t = torch_runs.get(torch_name[m], [])
    for a in (["recompute"] if m == "linear" else modes):
        rows = dtl_runs.get((m, a), [])
        if not rows or not t:
            print(f"| {m} | {a} | - | - | - | - |")
            continue
        d = [row["img_per_s"] for row in rows]
        mem = statistics.median(row["peak_rss_mib"] - row["idle_rss_mib"] for row in rows)
        ratio = statistics.median(d) / statistics.median(t)
        print(f"| {m} | {a} | {fmt(d)} | {fmt(t)} | {ratio:.2f} | {mem:.0f} |")
EOF
