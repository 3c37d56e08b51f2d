#!/bin/bash
# Stages of a GPU session, run on the device machine from a copy of the tree (tools/device/prepare.sh copies this
# to .carry/h100.sh). Usage there: LANE=0 MQ_ARGS='...' bash .carry/h100.sh env mqar ...
# Carry [".whl", ".carry/h100.sh", ".carry/tcache", ".carry/gbpack", ".carry/evaldata", ...] as the stages need;
# always carry .carry/tcache for stages that compile (qwen3, mqar, tt): without it a fresh machine spends minutes
# compiling (2026-12-06: a qwen3 mode was cut off that way).
# The carried size counts the tracked tree too (64 MiB in all): run from a copy of the tree the device already has,
#   mkdir -p /tmp/w && cp -r hylo benchmarks tools tests pyproject.toml /tmp/w/ && ln -sfn $PWD/.carry /tmp/w/.carry
#   && ln -sfn $PWD/.whl /tmp/w/.whl && cd /tmp/w && HYLO_COMMIT=<sha> LANE=0 ... bash .carry/h100.sh STAGES
# (a fixed path keeps inductor's cache keys stable between calls), carrying .whl, .carry/h100.sh, .carry/tcache and
# the data a stage needs (.carry/gbsmall, linked as .carry/gbpack, for tt: 4 MB; .carry/gbpack itself is 24 MB).
# passkey carries .whl, .carry/h100.sh, .carry/gbraw (46 MB), .carry/tok16k and .carry/evaldata: ~57 MB with the
# tree, so no .carry/tcache (its compile is ~1 min cold). decode and profile need only .whl and .carry/h100.sh.
# Results go to /tmp/res$LANE, tarred to $OUT/res$LANE.tgz; the Triton cache comes back as $OUT/tcache$LANE.part*
# pieces of 15 MB (the device returns files of at most 16 MiB): `cat tcache0.part* > .carry/tcache/all.tgz`.
set -u
LANE=${LANE:-0}
R=/tmp/res$LANE; mkdir -p $R
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD
export TRITON_CACHE_DIR=/tmp/tcache$LANE TRITON_CACHE_AUTOTUNING=1
# inductor's FX-graph and autotune caches travel in the same tarball: a warm machine skips Python-side compiling too
export TORCHINDUCTOR_CACHE_DIR=/tmp/tcache$LANE/inductor
mkdir -p $TRITON_CACHE_DIR
if [ ! -f $TRITON_CACHE_DIR/.restored ]; then
  for t in .carry/tcache/*.tgz; do [ -f "$t" ] && tar xzf "$t" -C $TRITON_CACHE_DIR 2>/dev/null; done
  touch $TRITON_CACHE_DIR/.restored
fi
export HYLO_COMMIT=${HYLO_COMMIT:-unknown}
lim() { timeout -k 15 -s INT "$1" "${@:2}"; echo "[rc $? : ${*:2:3}]"; }  # KILL 15 s after INT (a hung kernel)
for stage in "$@"; do
  echo "=== lane $LANE stage $stage $(date +%T)"
  case $stage in
    env) nvidia-smi --query-gpu=name,memory.used --format=csv; python3 -c "import torch,triton,fla;print(torch.__version__,triton.__version__,fla.__version__)";;
    mqar) ML=${MQ_LIMIT:-540}; eval lim $ML python3 benchmarks/mqar.py --out $R/mqar --wall-limit $((ML - 10)) $MQ_ARGS 2>&1 | grep -v "^ *[a-z0-9 ]* h=[0-9]* step" | tail -${MQ_TAIL:-60};;
    gutenberg-on) lim ${GB_LIMIT:-240} python3 benchmarks/gutenberg_run.py --data .carry/gbpack --heldout .carry/evaldata/gutenberg_val.txt.gz --wikitext .carry/evaldata/wiki.valid.tokens --modes on --runs-dir /tmp/gruns --out $R/gutenberg ${GB_ARGS:-} 2>&1 | tail -25;;
    retrieval) lim ${RT_LIMIT:-200} python3 -m hylo.cli eval retrieval /tmp/gruns/wn-on/run --lengths ${RT_LENGTHS:-1024,2048,4096} --haystack .carry/evaldata/gutenberg_val.txt.gz --out $R/retrieval 2>&1 | tail -30;;
    tt) lim ${TT_LIMIT:-400} python3 benchmarks/train_throughput.py --data .carry/gbpack --out $R/tt.json $TT_ARGS 2>&1 | tail -${TT_TAIL:-50};;
    qwen3) lim ${Q_LIMIT:-420} python3 benchmarks/qwen3_vs_transformers.py --out $R/qwen3.json $Q_ARGS 2>&1 | tail -40;;
    decode) # issue 4's kernel step (the default): the timeline of its options (preloading GEMVs; TL_CONFIGS may add
      # the attention's splits and blocks, @S/B, which lost in decode-timeline-h100-run8-slots.json), then against
      # transformers: ~6 min, at most 460 s (limits TL_LIMIT, QD_LIMIT); EC_LIMIT=S first runs the engine check
      # of the kernel step for S seconds
      [ -n "${EC_LIMIT:-}" ] && lim $EC_LIMIT python3 benchmarks/engine_check.py --models attn-swa-d512 --no-compile --out $R/engine_check_kstep.json 2>&1 | tail -4
      lim ${TL_LIMIT:-260} python3 benchmarks/decode_timeline.py --configs "${TL_CONFIGS:-eager,eager+nopre}" --caches 80 2048 --out $R/timeline.json 2>&1 | grep "ms/token\|rror" | tail -12
      lim ${QD_LIMIT:-200} python3 benchmarks/qwen3_vs_transformers.py --out $R/qwen3.json --modes "${Q_MODES:-eager,eager+nopre}" 2>&1 | grep "ms/token\|30x\|floor\|rror" | tail -12;;
    sums) # issue 4's float32 sums (HYLO_STEP_ATTN_OUT, HYLO_STEP_FFN_SPLIT) against the chain, checked and timed in one
      # process (attn-out-h100-run*.json): AO_VARIANTS at positions 16-80, then at AO_LONG (default 1024) with the
      # fused kernel forced on past HYLO_STEP_FUSED_MAX_POS, for the crossover; ~2 min (AO_LIMIT per call)
      lim ${AO_LIMIT:-120} python3 benchmarks/attn_out_check.py --caches 80 --variants "${AO_VARIANTS:-ffn,ao:64/16384/4+ffn}" --out $R/ao_s16.json 2>&1 | grep "ms/token\|rror" | cut -c1-250
      lim ${AO_LIMIT:-120} env HYLO_STEP_FUSED_MAX_POS=1000000 python3 benchmarks/attn_out_check.py --caches 2048 --start ${AO_LONG:-1024} --variants "${AO_VARIANTS:-ffn,ao:64/16384/4+ffn}" --check-steps 4 --greedy-steps 4 --out $R/ao_long.json 2>&1 | grep "ms/token\|rror" | cut -c1-250;;
    io) # issue 4, session 15: the step's own first/last kernels (HYLO_STEP_IO) against PyTorch's, the fused kernel
      # with its first K/V block before the wait (/p), at 16-80; the fused kernel's crossover (timed from
      # --more-starts with it forced on); the engine check with fused + FFN split crossing FUSED_MAX_POS=56 (both
      # graphs); ~5-6 min
      lim ${AO_LIMIT:-150} python3 benchmarks/attn_out_check.py --caches 80 --variants "${IO_VARIANTS:-torchio,ao:64/16384/4+ffn,ao:64/16384/4/p+ffn}" --out $R/ao_io.json 2>&1 | grep "ms/token\|rror" | cut -c1-300
      lim ${AX_LIMIT:-120} env HYLO_STEP_FUSED_MAX_POS=1000000 python3 benchmarks/attn_out_check.py --caches 2048 --variants "${AX_VARIANTS:-ao:64/16384/4+ffn}" --more-starts ${AX_STARTS:-48 80 112 144 192 256} --check-steps 4 --greedy-steps 4 --out $R/ao_cross.json 2>&1 | grep "ms/token\|rror" | cut -c1-200
      lim ${EC_LIMIT:-150} env HYLO_STEP_ATTN_OUT=fused HYLO_STEP_FFN_SPLIT=on HYLO_STEP_FUSED_MAX_POS=56 python3 benchmarks/engine_check.py --models attn-swa-d512 --no-compile --out $R/engine_check_fused.json 2>&1 | tail -3 | cut -c1-300
      [ -n "${Q_MODES:-}" ] && lim ${QD_LIMIT:-200} python3 benchmarks/qwen3_vs_transformers.py --out $R/qwen3.json --modes "$Q_MODES" 2>&1 | grep "ms/token\|30x\|floor\|rror" | tail -12;;
    tile) # issue 4: the fused kernel's tile and warps at 16-80 (TL_VARIANTS), then the Qwen3 benchmark (Q_MODES)
      # with the fastest entry's HYLO_ATTN_OUT_TILE / _BLOCK / _WARPS; ~4 min
      lim ${AO_LIMIT:-110} python3 benchmarks/attn_out_check.py --caches 80 --variants "${TL_VARIANTS:-ao:64/16384/4+ffn,ao:64/8192/4+ffn,ao:64/8192/8+ffn}" --check-steps 4 --greedy-steps 8 --out $R/ao_tile.json 2>&1 | grep "ms/token\|rror" | cut -c1-300
      best=$(python3 -c "import json;r=json.load(open('$R/ao_tile.json'))['results'];b=min((v for v in r.values() if v.get('attn_out')),key=lambda v:v['ms_per_token'])['attn_out'];print(b['tile'],b['block'],b['warps'])" 2>/dev/null || echo "16384 64 4")
      set -- $best; echo "fastest fused: tile $1 block $2 warps $3"
      lim ${QD_LIMIT:-200} env HYLO_ATTN_OUT_TILE=$1 HYLO_ATTN_OUT_BLOCK=$2 HYLO_ATTN_OUT_WARPS=$3 python3 benchmarks/qwen3_vs_transformers.py --out $R/qwen3.json --modes "${Q_MODES:-eager,eager+aofused+ffnsplit}" 2>&1 | grep "ms/token\|30x\|floor\|rror" | tail -12;;
    passkey) # issue 5: tokenize the carried Gutenberg shards (.carry/gbraw, .carry/tok16k) into .carry/gbfull, train
      # the passkey checkpoint (benchmarks/configs/passkey-attn-125m.yaml), then the retrieval heat map (carry also
      # .carry/evaldata); the run folder's small files come back
      lim ${PP_LIMIT:-150} python3 -m hylo.cli data prepare .carry/gbraw -t .carry/tok16k -o .carry/gbfull 2>&1 | tail -3
      lim ${PK_LIMIT:-360} python3 -m hylo.cli train benchmarks/configs/passkey-attn-125m.yaml --no-progress ${PK_ARGS:-} 2>&1 | tail -6
      mkdir -p $R/passkey
      cp /tmp/passkey-run/metrics.jsonl /tmp/passkey-run/curves.png /tmp/passkey-run/train_config.json $R/passkey/ 2>/dev/null
      lim ${RT_LIMIT:-100} python3 -m hylo.cli eval retrieval /tmp/passkey-run --lengths ${RT_LENGTHS:-512,1024,2048} --haystack .carry/evaldata/gutenberg_val.txt.gz --out $R/passkey 2>&1 | tail -12;;
    profile) # issue 4's predictor with the kernel step's pieces: extends the carried-in-tree LUT of profile-h100-run2
      # with kattn/kffn/khead, then measures and predicts the attention-only models (~3 min; PF_MODELS, PF_LIMIT)
      lim ${PF_LIMIT:-300} python3 benchmarks/profile_models.py --lut benchmarks/results/profile-h100-run2/lut.json --out $R/profile --models ${PF_MODELS:-all-attn-1b,qwen3-0.6b} 2>&1 | tail -25;;
    gemv) lim ${G_LIMIT:-150} python3 benchmarks/gemv.py --out $R/gemv.json ${G_ARGS:-} 2>&1 | tail -30;;
    ssdgrads) lim ${SSD_LIMIT:-330} python3 benchmarks/ssd_bwd_check.py --cases grads --case-timeout 240 --out $R/ssd_grads.json 2>&1 | tail -30;;
    cmd) eval "$CMD";;
    *) echo "unknown stage $stage";;
  esac
done
tar czf $OUT/res$LANE.tgz -C $R --exclude='runs' --exclude='checkpoints' --exclude='*.pt' --exclude='*.safetensors' . 2>/dev/null
tar czf - -C $TRITON_CACHE_DIR --exclude=.restored . 2>/dev/null | split -b 15m - $OUT/tcache$LANE.part
ls -la $OUT
