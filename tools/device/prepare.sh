#!/bin/bash
# Build what GPU sessions carry to the device machine (git-ignored .carry/ and .whl/), from ../shared/data.
# Run once per fresh checkout:  bash tools/device/prepare.sh   (~2 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .carry/evaldata .carry/tcache
cp -n "$DATA/corpus/gutenberg_val.txt.gz" "$DATA/wikitext103/wiki.valid.tokens" .carry/evaldata/
# fla-core and einops for the device image (it has torch, triton, transformers; no network there)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl fla-core==0.6.0 einops==0.8.2
# a 16k byte-level BPE and ~12M tokens of Gutenberg (two shards; 24 MB as uint16) for training runs
[ -d .carry/tok16k ] || hylo tokenizer train "$DATA/corpus/gutenberg_train_00.txt.gz" \
    "$DATA/corpus/gutenberg_train_01.txt.gz" --vocab-size 16384 --out .carry/tok16k
[ -d .carry/gbpack ] || hylo data prepare "$DATA/corpus/gutenberg_train_00.txt.gz" \
    "$DATA/corpus/gutenberg_train_01.txt.gz" -t .carry/tok16k -o .carry/gbpack
# five of the six Gutenberg training shards as they are (46 MB gzipped, ~31M tokens): the passkey stage tokenizes
# them on the device (a token pack of them would be 62 MB, past what a call carries)
mkdir -p .carry/gbraw && cp -n "$DATA"/corpus/gutenberg_train_0[0-4].txt.gz .carry/gbraw/
# a ~2M-token slice for the throughput stage (tt): small enough to carry beside the 50+ MB Triton/inductor cache
if [ ! -d .carry/gbsmall ]; then
    zcat "$DATA/corpus/gutenberg_train_00.txt.gz" | head -c 9000000 > /tmp/gbsmall.txt
    hylo data prepare /tmp/gbsmall.txt -t .carry/tok16k -o .carry/gbsmall
fi
cp tools/device/stages.sh .carry/h100.sh
du -sh .carry .whl
