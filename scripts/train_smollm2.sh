#!/usr/bin/env bash
# Train the Chimera draft for SmolLM2-135M-Instruct, the paper's two ablations and the two
# peers vLLM has built in (Medusa-1, EAGLE-1), all on the same data and budget (they share
# the cached target hidden states).
#
#   bash scripts/train_smollm2.sh                     # chimera, no-trigram, no-context, medusa, eagle
#   bash scripts/train_smollm2.sh chimera export      # one run, then ship it (fp16, in the package)
#   bash scripts/train_smollm2.sh chimera candidate   # ... or export it to RUNS/candidate-NAME, to
#                                                     # measure beside the shipped draft first
#   DATA=dataset bash scripts/train_smollm2.sh chimera  # on ShareGPT's own answers instead
#   bash scripts/train_smollm2.sh more-data && DATA=self+more EPOCHS=1 bash scripts/train_smollm2.sh
#                                                     # 2,048 more self-generated answers (MORE_PROMPTS)
#   bash scripts/train_smollm2.sh ship-data           # keep the generated answers in results/training/data
#   RECIPE=v2 DATA=self+more EPOCHS=3 THREADS=2 bash scripts/train_smollm2.sh cache chimera export
#                                                     # issue 14's recipe (below); runs named
#                                                     # *-v2-e3-more (the shipped draft)
#   bash scripts/train_smollm2.sh varied-data && DATA=varied ... bash scripts/train_smollm2.sh cache ...
#                                                     # + role-play/writing prompts (chimera-prepare
#                                                     # prompts) and EXTRA_PROMPTS more ShareGPT ones
#   RECIPE=v2 DATA=varied EPOCHS=2 INIT=shipped SEQUENTIAL=1 LR=3e-4 THREADS=2 bash scripts/train_smollm2.sh cache chimera export
#                                                     # continue the shipped draft on all varied
#                                                     # answers at a lower peak lr (*-lr3e-4)
#   RECIPE=v2 DATA=unseen EPOCHS=2 INIT=shipped SEQUENTIAL=1 LR=3e-4 MLP_WIDTH=3072 HEAD_WIDTH=1728 \
#     THREADS=2 bash scripts/train_smollm2.sh cache chimera candidate
#                                                     # the shipped draft grown wider, continued on the
#                                                     # answers it has not seen (*-mlp3072-head1728)
#   RECIPE=v2 DATA=unseen EPOCHS=2 INIT=shipped SEQUENTIAL=1 LR=3e-4 SKIP_LOOKUP=2 THREADS=2 \
#     bash scripts/train_smollm2.sh cache chimera candidate
#                                                     # the same, no loss where the lookup drafts
#   RECIPE=v2 DATA=unseen EPOCHS=2 INIT=shipped SEQUENTIAL=1 LR=3e-4 LAYERS=2,15,27 THREADS=2 \
#     bash scripts/train_smollm2.sh cache chimera candidate
#                                                     # the shipped draft reading the target's layers
#                                                     # 2, 15 and 27 too (EAGLE-3), continued on the
#                                                     # answers it has not seen (*-layers2-15-27)
#   RECIPE=v2 DATA=unseen EPOCHS=2 INIT=shipped SEQUENTIAL=1 LR=3e-4 LAYERS=2,15,27 SKIP_LOOKUP=2 \
#     THREADS=2 bash scripts/train_smollm2.sh cache chimera export
#                                                     # both: the shipped draft since 2026-12-06
#                                                     # (INIT=shipped then meant the draft before it;
#                                                     # continuing today's needs LAYERS=2,15,27, it
#                                                     # reads those layers)
#   bash scripts/train_smollm2.sh self-data && RECIPE=v2 DATA=self-prompts EPOCHS=2 INIT=shipped \
#     SEQUENTIAL=1 LR=3e-4 LAYERS=2,15,27 SKIP_LOOKUP=2 THREADS=2 bash scripts/train_smollm2.sh cache chimera candidate
#                                                     # the shipped draft continued on the target's
#                                                     # answers to prompts it wrote itself (Magpie;
#                                                     # half opened as one of MT-bench's kinds)
#   RECIPE=v2 DATA=self-prompts+unseen EPOCHS=1 INIT=shipped SEQUENTIAL=1 LR=3e-4 LAYERS=2,15,27 \
#     SKIP_LOOKUP=2 THREADS=2 bash scripts/train_smollm2.sh cache chimera export
#                                                     # both kinds of prompt in one epoch: the draft
#                                                     # shipped at commit fa2a1ef (INIT=shipped then
#                                                     # meant the draft of commit c1898c0)
#   SELF_PROMPTS=5120 bash scripts/train_smollm2.sh self-data   # (stopped at 3,902 answers)
#   RECIPE=v2 DATA=self-prompts-new+unseen EPOCHS=1 INIT=shipped SEQUENTIAL=1 LR=3e-4 LAYERS=2,15,27 \
#     SKIP_LOOKUP=2 THREADS=2 bash scripts/train_smollm2.sh cache chimera export
#                                                     # the shipped draft since 2026-12-06 (third):
#                                                     # that one continued on 1,536 more answers to
#                                                     # the target's own prompts and the ShareGPT ones
#                                                     # (INIT=shipped then meant the draft of fa2a1ef)
#   git show fa2a1ef:vllm_chimera/drafts/smollm2-chimera/{config.json,model.safetensors} -> RUNS/shipped-fa2a1ef/, then
#   RECIPE=v2 DATA=self-prompts-new+unseen SELF_PROMPTS_TO=3902 EPOCHS=1 INIT=RUNS/shipped-fa2a1ef SEQUENTIAL=1 \
#     LR=3e-4 LAYERS=2,15,27 SKIP_LOOKUP=2 KL=1 THREADS=2 bash scripts/train_smollm2.sh chimera candidate
#                                                     # the run that made the draft of fe22d6d, with
#                                                     # KL to the target's distribution too (*-kl1);
#                                                     # VOCAB=16384 instead of KL=1: its vocabulary
#                                                     # grown to 16,384 tokens (*-vocab16384)
#   SELF_PROMPTS=7680 bash scripts/train_smollm2.sh self-data   # (stopped at 6,261 answers; a rerun
#                                                     # answered the other 817: all 7,078 now)
#   RECIPE=v2 DATA=self-prompts-new+unseen SELF_PROMPTS_FROM=4725 EPOCHS=1 INIT=shipped SEQUENTIAL=1 LR=3e-4 \
#     LAYERS=2,15,27 SKIP_LOOKUP=2 KL=3 THREADS=2 bash scripts/train_smollm2.sh cache chimera export
#                                                     # the shipped draft of 2026-12-06 (fifth): the
#                                                     # one before, continued on 1,536 more answers to
#                                                     # its own prompts and the ShareGPT ones, KL 3
#                                                     # (reproduce it with SELF_PROMPTS_TO=6261: the
#                                                     # answers file holds 8,969 now)
#   SELF_PROMPTS=9728 bash scripts/train_smollm2.sh self-data   # 1,891 more: 8,969 answers in all
#   RECIPE=v2 DATA=self-prompts-new+unseen SELF_PROMPTS_FROM=6261 EPOCHS=1 INIT=shipped SEQUENTIAL=1 LR=3e-4 \
#     LAYERS=2,15,27 SKIP_LOOKUP=2 KL=3 THREADS=2 bash scripts/train_smollm2.sh cache chimera export
#                                                     # the shipped draft since 2026-12-06 (sixth): the
#                                                     # one before, continued on the last 2,708 answers
#                                                     # (817 + 1,891) and the ShareGPT ones, KL 3
#                                                     # (reproduce it with SELF_PROMPTS_TO=8969 once
#                                                     # the file grows). Next: more prompts
#                                                     # (SELF_PROMPTS=12288), SELF_PROMPTS_FROM=8969
#   RECIPE=v2 DATA=unseen EPOCHS=1 SEQUENTIAL=1 LAYERS=2,15,27 ENCODER_LAYERS=2 THREADS=2 bash scripts/train_smollm2.sh chimera
#                                                     # a second encoder layer, from scratch (*-enc2)
#   RECIPE=v2 DATA=new EPOCHS=2 INIT=shipped bash scripts/train_smollm2.sh cache chimera  (TRAIN_TOKENS=N: a slice)
#                                                     # train the shipped draft on further: only the
#                                                     # repository outlives a machine here, so a
#                                                     # session caches a slice of the data it has time
#                                                     # for and continues the last draft on it (runs
#                                                     # named *-new-from-shipped; SEQUENTIAL=1: as
#                                                     # sequential heads, *-seq-new-from-shipped)
#
# DATA=self (default): ShareGPT first user turns answered by SmolLM2 itself (greedy, vLLM,
#            scripts/generate_responses.py; generated once, about 20 min here, or restored
#            from results/training/data).
# DATA=self+more: plus 2,048 more (stage more-data). DATA=varied: plus the target's answers to
#            the role-play and writing prompts and to EXTRA_PROMPTS (4,096) further ShareGPT
#            first turns (stage varied-data; runs named *-varied). Measured 2026-12-03 on 2
#            cores: 1,019 act-as answers in 33 min (152 tokens/s), ShareGPT ones at 191
#            tokens/s (768 in 19 min; all 4,096 would take ~1.7 h). Resumable: rerunning
#            the stage continues each file where it stopped (3,840 of 4,096 extra so far;
#            the last 1,792 took 96 min at 89 tokens/s on 2026-12-04's slower machine).
# DATA=new: only the answers of stage varied-data (role-play/writing first), for a draft
#            that has seen self+more already (INIT=shipped); TRAIN_TOKENS caps the slice.
# DATA=unseen: only the extra answers after the first UNSEEN_FROM (768: the shipped draft,
#            *-varied-from-shipped, saw the extra file's first 768), copied once into a file of
#            their own so that its cache holds only them; for continuing the shipped draft
#            (INIT=shipped LR=3e-4). Runs named *-unseen768.
# DATA=self-prompts: only the target's answers to the SELF_PROMPTS (2,560) prompts it wrote
#            itself (stage self-data, scripts/generate_prompts.py; 2,366 kept, answered at 168
#            tokens/s here on 2026-12-06); runs named *-self-prompts.
# DATA=self-prompts+unseen: both (self-prompts first), so that a draft continued on the
#            self-written prompts' answers keeps seeing ShareGPT's kind of prompt.
# DATA=self-prompts-new+unseen: the self-prompts answers after the first SELF_PROMPTS_FROM
#            (2,366: those the shipped draft of 2026-12-06 saw; a file of their own, rewritten
#            only when the answers file has grown) and the unseen ShareGPT ones, for continuing
#            that draft (INIT=shipped); runs named *-self-prompts-newN-unseen768.
# DATA=dataset: ShareGPT conversations with ShareGPT's answers.
# Labels are the target's own greedy predictions either way (self-distillation).
#
# One CPU thread per training run (THREADS=1) so two stages can run side by side:
#   bash scripts/train_smollm2.sh cache && (bash scripts/train_smollm2.sh chimera no-trigram &
#   bash scripts/train_smollm2.sh no-context medusa eagle; wait)
# Measured on this 2-core CPU with one thread: caching the target's outputs runs at about
# 270 tokens/s, a K=4 training step at about 200 tokens/s (the four full-vocabulary
# LM-head projections dominate); 300k training tokens: 19 min caching + 25 min per epoch.
# Re-running resumes an interrupted run from its last checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # here, py, cache, runs
data="${DATA:-self}"
# Every core, counted before the export below: GNU nproc reports OMP_NUM_THREADS when it is
# set, so "$(nproc)" after it gave the cache stage 1 thread on this 2-core machine.
num_cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

"$py" -m vllm_chimera.commands.train --help >/dev/null  # fail early on a broken install
"$py" -c "from vllm_chimera.commands.prepare import prepare_main; prepare_main(['target', 'smollm2'])"
"$py" -c "from vllm_chimera.commands.prepare import prepare_main; prepare_main(['data'])"
sharegpt="$cache/data/sharegpt"
# The target's answers are the expensive part of the data (about 50 min for all three files
# on this CPU), so stage ship-data keeps them in the repository, gzipped; a fresh machine
# restores them instead of generating them again (delete the cache file to regenerate).
shipped_data="$here/results/training/data"
answer_files=(train.smollm2-self validation.smollm2-self train.smollm2-self-more
              train.smollm2-self-actas train.smollm2-self-extra train.smollm2-self-prompts)
restore() {  # restore NAME: the shipped NAME.jsonl.gz into the cache, unless already there
  local out="$sharegpt/$1.jsonl" gz="$shipped_data/$1.jsonl.gz"
  if [ ! -f "$out" ] && [ -f "$gz" ]; then
    gunzip -c "$gz" > "$out.tmp" && mv "$out.tmp" "$out"
    echo "restored $(wc -l < "$out") answers: $gz -> $out"
  fi
}
for name in "${answer_files[@]}"; do restore "$name"; done
if [ "$data" = self ] || [ "$data" = self+more ] || [ "$data" = varied ] || [ "$data" = new ] \
   || [ "$data" = unseen ] || [ "$data" = self-prompts ] || [ "$data" = self-prompts+unseen ] \
   || [ "$data" = self-prompts-new+unseen ]; then
  for split in train:1100 validation:64; do
    name="${split%%:*}"; n="${split##*:}"; out="$sharegpt/$name.smollm2-self.jsonl"
    if [ ! -f "$out" ]; then
      "$py" "$here/scripts/generate_responses.py" --target "$cache/targets/smollm2" \
        --prompts "$sharegpt/$name.jsonl" --num-prompts "$n" --max-tokens 384 --output "$out.tmp"
      mv "$out.tmp" "$out"
    fi
  done
  data_flags=(--train-data "$sharegpt/train.smollm2-self.jsonl"
              --val-data "$sharegpt/validation.smollm2-self.jsonl")
  suffix=
  if [ "$data" = self+more ]; then  # plus the answers of stage more-data (its own cache)
    data_flags=(--train-data "$sharegpt/train.smollm2-self.jsonl,$sharegpt/train.smollm2-self-more.jsonl"
                --val-data "$sharegpt/validation.smollm2-self.jsonl")
    suffix=-more
  elif [ "$data" = varied ]; then  # plus the answers of stage varied-data (each file its own cache)
    data_flags=(--train-data "$sharegpt/train.smollm2-self.jsonl,$sharegpt/train.smollm2-self-more.jsonl,$sharegpt/train.smollm2-self-actas.jsonl,$sharegpt/train.smollm2-self-extra.jsonl"
                --val-data "$sharegpt/validation.smollm2-self.jsonl")
    suffix=-varied
  elif [ "$data" = unseen ] || [ "$data" = self-prompts+unseen ] || [ "$data" = self-prompts-new+unseen ]; then
    # the extra answers after the first UNSEEN_FROM (a file of their own)
    unseen_from="${UNSEEN_FROM:-768}"
    unseen="$sharegpt/train.smollm2-self-extra-from$unseen_from.jsonl"
    [ -f "$unseen" ] || { tail -n "+$((unseen_from + 1))" "$sharegpt/train.smollm2-self-extra.jsonl" > "$unseen.tmp" \
                          && mv "$unseen.tmp" "$unseen"; }
    echo "DATA=$data: $(wc -l < "$unseen") answers in $unseen"
    data_flags=(--train-data "$unseen" --val-data "$sharegpt/validation.smollm2-self.jsonl")
    suffix=-unseen$unseen_from
    if [ "$data" = self-prompts+unseen ]; then  # the answers of stage self-data first, then those
      data_flags=(--train-data "$sharegpt/train.smollm2-self-prompts.jsonl,$unseen"
                  --val-data "$sharegpt/validation.smollm2-self.jsonl")
      suffix=-self-prompts-unseen$unseen_from
    elif [ "$data" = self-prompts-new+unseen ]; then  # the newer self-prompts answers, then those
      new_from="${SELF_PROMPTS_FROM:-2366}"
      # SELF_PROMPTS_TO=N: up to answer N only ($: the last). The file keeps its name, so
      # switching between N and the last rewrites it and its cache is built again.
      new_to="${SELF_PROMPTS_TO:-\$}"
      new_answers="$sharegpt/train.smollm2-self-prompts-from$new_from.jsonl"
      sed -n "$((new_from + 1)),${new_to}p" "$sharegpt/train.smollm2-self-prompts.jsonl" > "$new_answers.tmp"
      if cmp -s "$new_answers.tmp" "$new_answers"; then rm "$new_answers.tmp"  # (its cache stays valid)
      else mv "$new_answers.tmp" "$new_answers"; fi
      echo "DATA=$data: $(wc -l < "$new_answers") answers in $new_answers"
      data_flags=(--train-data "$new_answers,$unseen" --val-data "$sharegpt/validation.smollm2-self.jsonl")
      suffix=-self-prompts-new$new_from${SELF_PROMPTS_TO:+to$SELF_PROMPTS_TO}-unseen$unseen_from
    fi
  elif [ "$data" = self-prompts ]; then  # only the answers of stage self-data
    data_flags=(--train-data "$sharegpt/train.smollm2-self-prompts.jsonl"
                --val-data "$sharegpt/validation.smollm2-self.jsonl")
    suffix=-self-prompts
  elif [ "$data" = new ]; then
    data_flags=(--train-data "$sharegpt/train.smollm2-self-actas.jsonl,$sharegpt/train.smollm2-self-extra.jsonl"
                --val-data "$sharegpt/validation.smollm2-self.jsonl")
    suffix=-new
  fi
else
  data_flags=()
  suffix=-sharegpt
fi

# The recipe (chosen by a 60-step pilot on 80k ShareGPT tokens; numbers in
# results/training/README.md): a reduced draft vocabulary of the 8192 tokens the target
# predicts most often makes a step 3.4x cheaper at equal accuracy (the full 49,152-token
# LM-head projections were ~90% of a step); lr 1e-3 learned as fast as 3e-3.
# bf16 where this CPU computes it natively (AMX / AVX-512-BF16; recipe-pilots/bf16/README.md): the
# target's forward over the training answers (labels 99.4% the same as fp32's; validation
# stays fp32) and the draft's autocast. Elsewhere fp32, as before. PRECISION=fp32 forces it.
if [ -z "${PRECISION:-}" ]; then
  PRECISION="$("$py" -c "import torch; print('bf16' if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported() else 'fp32')")"
fi
precision_flags=(--cache-precision "$PRECISION")
[ "$PRECISION" = fp32 ] || precision_flags+=(--autocast bf16)
common=(--target smollm2 --num-heads 4 --max-length 512 --val-tokens 20000 "${precision_flags[@]}"
        --epochs "${EPOCHS:-3}" --batch-size 4 --micro-batch-size 2 --lr "${LR:-1e-3}" --warmup-ratio 0.05
        --save-every 25 --eval-every 200 --seed 0 "${data_flags[@]}")
threads="${THREADS:-1}"  # torch threads per run; run two stages side by side on two cores
# RECIPE=v2 (issue 14, results/training/recipe-pilots): the parallel heads' loss on a random
# quarter of each sequence's positions per step (2.2x cheaper steps, better at equal CPU
# seconds), plus the bf16 above where native. EAGLE's rollout spans every position: it keeps
# its own recipe (feature regression + CE) with bf16 only. Runs are named *-v2.
recipe="${RECIPE:-v1}"
heads_flags=()
case "$recipe" in
  v1) ;;
  v2) heads_flags=(--loss-positions-fraction 0.25); suffix="-v2${EPOCHS:+-e$EPOCHS}$suffix"
      common+=(--eval-every 400) ;;  # (the last --eval-every wins; EPOCHS=7: *-v2-e7-*)
  *) echo "unknown RECIPE $recipe (v1, v2)" >&2; exit 2 ;;
esac

[ -z "${TRAIN_TOKENS:-}" ] || common+=(--train-tokens "$TRAIN_TOKENS")
# MLP_WIDTH=N / HEAD_WIDTH=N: the encoder layer's MLP width and the heads' hidden width
# (chimera; defaults 1536 and 576 for SmolLM2). With INIT, wider than the saved draft's
# grows it, starting from exactly its function (runs named *-mlpN, *-headN).
width_flags=()
[ -z "${MLP_WIDTH:-}" ] || { width_flags+=(--draft-intermediate-size "$MLP_WIDTH"); suffix="$suffix-mlp$MLP_WIDTH"; }
[ -z "${HEAD_WIDTH:-}" ] || { width_flags+=(--head-intermediate-size "$HEAD_WIDTH"); suffix="$suffix-head$HEAD_WIDTH"; }
# ENCODER_LAYERS=N: a deeper full-context encoder (chimera; 1 in the paper). With INIT, the
# new layers start as the identity on top of the saved draft's (runs named *-encN).
[ -z "${ENCODER_LAYERS:-}" ] || { width_flags+=(--encoder-layers "$ENCODER_LAYERS"); suffix="$suffix-enc$ENCODER_LAYERS"; }
# LAYERS=2,15,27 (or default): the draft also reads the target's residual stream at these
# layers (EAGLE-3's lesson; chimera-train --target-layer-ids); the cache stage then stores
# them too, in caches of their own (runs named *-layers2-15-27). With INIT, the saved draft
# starts reading them from exactly its own function.
if [ -n "${LAYERS:-}" ]; then
  common+=(--target-layer-ids "$LAYERS"); suffix="$suffix-layers${LAYERS//,/-}"
fi
# SKIP_LOOKUP=2: no loss where the context lookup (min_match 2, its default) would draft,
# the only positions the heads draft at inside vLLM with the lookup on (chimera-train
# --skip-lookup-matches; runs named *-skiplookup2).
[ -z "${SKIP_LOOKUP:-}" ] || { common+=(--skip-lookup-matches "$SKIP_LOOKUP"); suffix="$suffix-skiplookup$SKIP_LOOKUP"; }
# KL=W: Medusa-2's self-distillation beside the CE on the target's greedy token, the KL from
# the target's next-token distribution over the draft vocabulary at weight W (chimera-train
# --kl-weight; runs named *-klW).
[ -z "${KL:-}" ] || { common+=(--kl-weight "$KL"); suffix="$suffix-kl$KL"; }
# VOCAB=N: a reduced draft vocabulary of N tokens (chimera, its ablations and Medusa; 8192 by
# default). With INIT, more than the saved draft's grows it: its tokens keep their rows, the
# data's next most frequent are added with the target's rows (runs named *-vocabN).
vocab="${VOCAB:-8192}"; [ -z "${VOCAB:-}" ] || suffix="$suffix-vocab$VOCAB"
# INIT=shipped: start from the shipped draft (chimera only), INIT=DIR from that draft folder.
init_flags=()
if [ -n "${INIT:-}" ]; then
  init_dir="$INIT"; [ "$INIT" != shipped ] || init_dir="$here/vllm_chimera/drafts/smollm2-chimera"
  init_flags=(--init-from "$init_dir"); suffix="$suffix-from-$(basename "$INIT")"
fi
# LR=3e-4: another peak learning rate (runs named *-lr3e-4). For a continuation (INIT=...):
# restarting the shipped draft at the default 1e-3 cost it ~1,500 steps of held-out accuracy
# (results/training/README.md, "All the answers").
[ -z "${LR:-}" ] || suffix="$suffix-lr$LR"

run() {  # run NAME [extra flags]: train, then copy the small outputs into results/training/NAME
  local name="$1$suffix"; shift
  "$py" -m vllm_chimera.commands.train "${common[@]}" --num-threads "$threads" \
    --output-dir "$runs/smollm2-$name" "$@"
  mkdir -p "$here/results/training/$name"
  cp "$runs/smollm2-$name"/{metrics.json,log.jsonl,loss_curve.png} "$here/results/training/$name/"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(cache chimera no-trigram no-context medusa eagle)
for stage in "${stages[@]}"; do
  case "$stage" in
    cache)  # fill the shared cache of target outputs once, with every core
      OMP_NUM_THREADS="$num_cores" MKL_NUM_THREADS="$num_cores" "$py" -m vllm_chimera.commands.train \
        "${common[@]}" --num-threads "$num_cores" --output-dir "$runs/cache" --cache-only ;;
    more-data)  # the target's answers to the next MORE_PROMPTS ShareGPT prompts (resumable,
      # and a larger MORE_PROMPTS later extends the file; then DATA=self+more trains on both
      # files, each with its own cache)
      "$py" "$here/scripts/generate_responses.py" --target "$cache/targets/smollm2" \
        --prompts "$sharegpt/train.jsonl" --skip-prompts 1100 --num-prompts "${MORE_PROMPTS:-2048}" \
        --max-tokens 384 --output "$sharegpt/train.smollm2-self-more.jsonl" ;;
    varied-data)  # the target's answers to the role-play and writing prompts, then to the
      # EXTRA_PROMPTS ShareGPT first turns after the 1100 + 2048 above (both resumable)
      "$py" -c "from vllm_chimera.commands.prepare import prepare_main; prepare_main(['prompts'])"
      "$py" "$here/scripts/generate_responses.py" --target "$cache/targets/smollm2" \
        --prompts "$cache/data/prompts/act-as.jsonl" --num-prompts 100000 \
        --max-tokens 384 --output "$sharegpt/train.smollm2-self-actas.jsonl"
      "$py" "$here/scripts/generate_responses.py" --target "$cache/targets/smollm2" \
        --prompts "$sharegpt/train.jsonl" --skip-prompts 3148 --num-prompts "${EXTRA_PROMPTS:-4096}" \
        --max-tokens 384 --output "$sharegpt/train.smollm2-self-extra.jsonl" ;;
    self-data)  # SELF_PROMPTS (2560) attempts at prompts the target writes itself
      # (scripts/generate_prompts.py: Magpie, half from an opening word of one of MT-bench's
      # kinds), then its answers to the kept ones (both resumable; then DATA=self-prompts).
      # The prompts and their summary are shipped too (ship-data): restored, they continue.
      self_prompts="$cache/data/prompts/self.jsonl"
      if [ ! -f "$self_prompts" ] && [ -f "$shipped_data/self-prompts.jsonl.gz" ]; then
        mkdir -p "$(dirname "$self_prompts")"
        cp "$shipped_data/self-prompts.summary.json" "$self_prompts.summary.json"
        gunzip -c "$shipped_data/self-prompts.jsonl.gz" > "$self_prompts"
      fi
      "$py" "$here/scripts/generate_prompts.py" --target "$cache/targets/smollm2" \
        --num-prompts "${SELF_PROMPTS:-2560}" --output "$cache/data/prompts/self.jsonl"
      "$py" "$here/scripts/generate_responses.py" --target "$cache/targets/smollm2" \
        --prompts "$cache/data/prompts/self.jsonl" --num-prompts 100000 \
        --max-tokens 384 --output "$sharegpt/train.smollm2-self-prompts.jsonl" ;;
    ship-data)  # keep the generated answers in the repository (see restore above)
      mkdir -p "$shipped_data"
      for name in "${answer_files[@]}"; do
        [ ! -f "$sharegpt/$name.jsonl" ] || gzip -n -9 -c "$sharegpt/$name.jsonl" > "$shipped_data/$name.jsonl.gz"
      done
      if [ -f "$cache/data/prompts/self.jsonl" ]; then  # (stage self-data restores them)
        gzip -n -9 -c "$cache/data/prompts/self.jsonl" > "$shipped_data/self-prompts.jsonl.gz"
        cp "$cache/data/prompts/self.jsonl.summary.json" "$shipped_data/self-prompts.summary.json"
      fi
      ls -l "$shipped_data" ;;
    chimera)
      if [ -n "${SEQUENTIAL:-}" ]; then  # Hydra-style sequential heads (chimera-train --sequential-heads)
        run chimera-k4-seq --draft-vocab-size "$vocab" --sequential-heads "${heads_flags[@]}" "${init_flags[@]}" \
          "${width_flags[@]}"
      else
        run chimera-k4 --draft-vocab-size "$vocab" "${heads_flags[@]}" "${init_flags[@]}" "${width_flags[@]}"
      fi ;;
    no-trigram) run no-trigram-k4 --draft-vocab-size "$vocab" --no-trigram-encoder "${heads_flags[@]}" ;;
    no-context) run no-context-k4 --draft-vocab-size "$vocab" --no-context-encoder "${heads_flags[@]}" ;;
    # One reduced LM head shared by the 4 heads, as Chimera's (vLLM's Medusa loads a reduced
    # head only in its shared form: original_lm_head + token_map).
    medusa) run medusa-k4 --draft-kind medusa --medusa-shared-lm-head --draft-vocab-size "$vocab" \
              "${heads_flags[@]}" ;;
    eagle) run eagle-k4 --draft-kind eagle ;;
    run-suffix)  # what this DATA/RECIPE/EPOCHS/INIT/LR names its runs: RUNS/smollm2-STAGE-kK$suffix
      echo "run-suffix: $suffix" ;;
    candidate|export)
      # export: the shipped draft, the chimera run's weights in fp16 inside the package.
      # candidate: the same export to $runs/candidate-NAME instead, to measure it beside the
      # shipped draft (measure_acceptance.py, chimera-bench) before shipping it.
      # Both keep the step-aside schedules measured for the shipped draft, and say so: with
      # none, vLLM would draft K=4 at every batch size (0.62x at batch 16 here).
      src="$runs/smollm2-chimera-k4${SEQUENTIAL:+-seq}$suffix/draft"
      shipped="$here/vllm_chimera/drafts/smollm2-chimera"
      dst="$shipped"; [ "$stage" = export ] || dst="$runs/candidate-chimera-k4${SEQUENTIAL:+-seq}$suffix"
      "$py" - "$src" "$dst" "$shipped" <<'EOF'
import sys
from pathlib import Path
from vllm_chimera.measurements import load_measurements
from vllm_chimera.training.checkpointing import export_draft
src, dst, shipped = sys.argv[1:]
measured = load_measurements(shipped) if Path(shipped, "config.json").is_file() else {}
kept = {device: m.step_aside_schedule for device, m in measured.items() if m.step_aside_schedule}
export_draft(src, dst, step_aside_schedules=kept)
print(f"exported {src} -> {dst}" + (f"; kept the step-aside schedules of the shipped draft, "
      f"{kept}: re-measure them for this draft with chimera-bench --save-schedule" if kept else ""))
EOF
      ;;
    *) echo "unknown stage $stage (more-data, varied-data, self-data, ship-data, cache, chimera, no-trigram, no-context, medusa, eagle, candidate, export, run-suffix)" >&2
       exit 2 ;;
  esac
done
