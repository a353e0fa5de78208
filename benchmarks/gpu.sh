#!/usr/bin/env bash
# What a lent GPU runs, in one call (the device tool's `run`, from the repository root, with the
# wheels of the packages its image lacks in .whl/, carried): the decoder's numerical tests on CUDA,
# the throughput and generation benchmarks on a larger model in bf16, and FSDP2 (the quickstart task
# with bf16-mixed: a sharded checkpoint and a resume; the 113M model with gradient checkpointing; and
# FSDP1 refused with its message). Results land in $OUT (copy them into benchmarks/results/gpu/).
# Each part has its own time limit and runs even if an earlier one failed; the log says which passed.
#   bash benchmarks/gpu.sh                       # every part; OUT defaults to /tmp/gpu-out
#   bash benchmarks/gpu.sh fsdp throughput       # only these parts (decoder, mismatch, throughput, generation, sampling, fsdp)
#   STEPS=3 REPEATS=1 bash benchmarks/gpu.sh throughput   # a shorter throughput run
#   bash benchmarks/gpu.sh compile               # policy.compile on the GPU (not in the default parts:
#                                                # ~4 more minutes; run it as a second call)
#   bash benchmarks/gpu.sh vocab                 # a real vocabulary: a Qwen2.5-0.5B-shaped model (vocab 151,936,
#                                                # random init), bf16, natural lengths, retrain vs TRL (~6 minutes;
#                                                # not in the default parts: run it as a second call)
# The wheels (the device image had torch 2.11, lightning 2.6.6, peft and pyarrow 25, but no trl,
# datasets or jsonargparse, and transformers 5.17), fetched here once per session into an ignored .whl/:
#   echo /.whl/ >> .git/info/exclude; pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 \
#     jsonargparse==4.53.0 fsspec==2026.9.0 docstring-parser typeshed-client
set -u
OUT=${OUT:-/tmp/gpu-out}
parts=${*:-decoder mismatch throughput generation sampling fsdp}
want() { [[ " $parts " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
log="$OUT/log.txt"
step() { echo; echo "=== $1 ($(date +%T))"; }
{
  step "setup"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || export PYTHONPATH=${PYTHONPATH:-}:$PWD/src
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, trl, lightning, datasets, pyarrow, retrain; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__, '| lightning', lightning.__version__, '| datasets', datasets.__version__, '| pyarrow', pyarrow.__version__)"
  results=()

  if want decoder; then
    step "decoder tests on CUDA"
    RETRAIN_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider tests/rollout/test_decoding.py
    results+=("decoder tests: exit $?")
  fi

  if want mismatch; then
    step "sampler log-probs on CUDA: decoder and generate vs the trainer, float32 and bf16, medium model"
    timeout 180 python3 benchmarks/mismatch.py --device cuda --model-size medium --rows 64 --tokens 128 --out-dir "$OUT/mismatch" \
      && python3 -c "
import json; r = json.load(open('$OUT/mismatch/mismatch.json'))['results']
assert r['auto/float32']['own_decoder_used'] and r['auto/float32']['max_abs_logprob_diff'] < 1e-3, r['auto/float32']
print('float32 decoder log-probs match the trainer on CUDA:', r['auto/float32']['max_abs_logprob_diff'])"
    results+=("mismatch: exit $?")
  fi

  if want throughput; then
    step "throughput: medium model, bf16, retrain vs TRL"
    timeout 300 python3 benchmarks/throughput.py --device cuda --dtype bfloat16 --model-size medium --prompts 8 --generations 8 \
      --completion-length 128 --steps "${STEPS:-5}" --repeats "${REPEATS:-2}" --out-dir "$OUT/throughput"
    results+=("throughput: exit $?")
  fi

  if want generation; then
    step "generation: decoder vs generate, medium model, bf16"
    timeout 120 python3 benchmarks/generation.py --device cuda --dtype bfloat16 --model-size medium --rows 64 --tokens 128 \
      --repeats 3 --out-dir "$OUT/generation"
    results+=("generation: exit $?")
  fi

  if want sampling; then
    step "sampling: the draw at vocab 32,000 and 151,936 on CUDA (multinomial, exponential race, retrain's inverse CDF)"
    RETRAIN_TEST_DEVICE=cuda timeout 60 python3 -m pytest -q -p no:cacheprovider tests/rollout/test_draw.py -k "not decoder_draws"
    timeout 120 python3 benchmarks/sampling.py --device cuda --vocab 32000 151936 --rows 64 --tokens 128 --out-dir "$OUT/sampling"
    results+=("sampling: exit $?")
  fi

  if want fsdp; then
    step "FSDP1 (FSDPStrategy) is refused with a clear message"
    timeout 120 retrain fit --config configs/quickstart_fsdp.yaml --trainer.strategy fsdp --trainer.max_steps 2 > /tmp/fsdp1.txt 2>&1
    code=$?
    tail -8 /tmp/fsdp1.txt
    [ $code -ne 0 ] && grep -q "cannot run retrain's training step" /tmp/fsdp1.txt
    results+=("fsdp1 refused: exit $?")

    step "quickstart under FSDP2 + bf16-mixed: 20 steps, sharded checkpoint, resume to 30"
    rm -rf outputs/quickstart_fsdp
    timeout 150 retrain fit --config configs/quickstart_fsdp.yaml --trainer.max_steps 20 --trainer.enable_progress_bar false \
      && ls -R outputs/quickstart_fsdp/checkpoints | head -20 \
      && timeout 150 retrain fit --config configs/quickstart_fsdp.yaml --trainer.max_steps 30 --trainer.enable_progress_bar false \
        --ckpt_path outputs/quickstart_fsdp/checkpoints/last.ckpt \
      && python3 -c "
import csv, glob, math
rows = [r for f in sorted(glob.glob('outputs/quickstart_fsdp/csv/*/metrics.csv')) for r in csv.DictReader(open(f))]
steps = sorted({int(r['step']) for r in rows if r.get('train/reward')})
assert steps[-1] == 30, steps  # rows are labelled by updates done (1..30)
assert all(math.isfinite(float(r['train/loss'])) for r in rows if r.get('train/loss')), 'non-finite loss'
print('FSDP2: steps', steps[0], '..', steps[-1], 'logged across both runs; every loss finite')"
    results+=("fsdp2 quickstart + resume: exit $?")

    step "FSDP2 + bf16-mixed + gradient checkpointing on the medium model (113M), 8 steps"
    timeout 150 retrain fit --config configs/quickstart_fsdp.yaml --trainer.max_steps 8 --trainer.enable_progress_bar false \
      --model.init_args.policy.name_or_path outputs/medium-llama --model.init_args.policy.tiny.hidden_size 768 \
      --model.init_args.policy.tiny.num_layers 12 --model.init_args.policy.tiny.num_heads 12 \
      --model.init_args.policy.tiny.intermediate_size 3072 --model.init_args.policy.gradient_checkpointing true \
      --model.init_args.max_completion_length 64 --trainer.default_root_dir outputs/medium_fsdp --trainer.callbacks '[]' \
      --trainer.logger '{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: outputs/medium_fsdp}}' \
      && python3 -c "
import csv, glob, math
rows = [r for f in glob.glob('outputs/medium_fsdp/lightning_logs/*/metrics.csv') for r in csv.DictReader(open(f))]
losses = [float(r['train/loss']) for r in rows if r.get('train/loss')]
assert len(losses) == 8 and all(map(math.isfinite, losses)), losses
print('medium FSDP2: 8 finite losses, first', losses[0], 'last', losses[-1])"
    results+=("fsdp2 medium + gradient checkpointing: exit $?")
  fi

  if want compile; then
    step "policy.compile: throughput on the medium model, bf16, retrain compiled vs TRL"
    timeout 330 python3 benchmarks/throughput.py --device cuda --dtype bfloat16 --model-size medium --prompts 8 --generations 8 \
      --completion-length 128 --steps "${STEPS:-5}" --repeats 1 --retrain-compile --out-dir "$OUT/compile"
    results+=("compiled throughput: exit $?")

    step "policy.compile under FSDP2 + bf16-mixed: the quickstart, 10 steps"
    rm -rf outputs/quickstart_fsdp
    timeout 200 retrain fit --config configs/quickstart_fsdp.yaml --trainer.max_steps 10 --trainer.enable_progress_bar false \
      --model.init_args.policy.compile true \
      && python3 -c "
import csv, glob, math
rows = [r for f in sorted(glob.glob('outputs/quickstart_fsdp/csv/*/metrics.csv')) for r in csv.DictReader(open(f))]
losses = [float(r['train/loss']) for r in rows if r.get('train/loss')]
assert len(losses) == 10 and all(map(math.isfinite, losses)), losses
print('compiled FSDP2: 10 finite losses')"
    results+=("compiled fsdp2 quickstart: exit $?")
  fi

  if want vocab; then
    step "real vocabulary: Qwen2.5-0.5B's shape (vocab 151,936), bf16, natural lengths (end probability 1/200, at most 512)"
    timeout 420 python3 benchmarks/throughput.py --device cuda --dtype bfloat16 --model-size qwen05 --vocab-size 151936 \
      --end-probability 0.005 --completion-length 512 --prompts 8 --generations 8 --steps "${STEPS:-3}" --repeats 1 \
      --out-dir "$OUT/vocab"
    results+=("real vocabulary throughput: exit $?")
  fi

  step "summary"
  printf '%s\n' "${results[@]}"
} 2>&1 | tee "$log"
