"""The command line of training (argparse lives here only; the logic is vllm_chimera.training).

    chimera-train recipe recipes/smollm2-chimera.toml        a whole recipe file, resumable
    chimera-train train --target smollm2 --output-dir runs/chimera [options]
    chimera-train cache ...                                  the target's outputs only
    chimera-train evaluate DRAFT_DIR --target ... --val-data ... --output-dir OUT
    chimera-train average DRAFT_DIR DRAFT_DIR ... --target ... --output-dir OUT
    chimera-train export SRC_DRAFT DST [--keep-schedules-from SHIPPED_DRAFT]
    chimera-train --target smollm2 --output-dir runs/chimera [options]   (= train; the flat
        form keeps --cache-only, --evaluate and --average)
    torchrun --nproc-per-node 2 -m vllm_chimera.commands.train train --target ... (GPUs)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from vllm_chimera.checkpoint import ChimeraCheckpointError
from vllm_chimera.prepare.cache import cache_dir, sharegpt_dir, target_dir
from vllm_chimera.target_layers import default_target_layer_ids, target_layer_ids_problem
from vllm_chimera.training.checkpointing import average_into, export_draft_keeping_schedules
from vllm_chimera.training.recipe import (RecipeError, dumps_table, load_recipe,
                                          precision_settings, run_recipe, stage_init)
from vllm_chimera.training.settings import TrainingSettings
from vllm_chimera.training.trainer import cache_only, evaluate_to_file, train

SUBCOMMANDS = ("recipe", "train", "cache", "evaluate", "average", "export")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


TRAIN_DESCRIPTION = (
    "Self-distil a Chimera draft (or, for the benchmark, Medusa-1 heads or an EAGLE-1 draft) "
    "from a frozen target. The finished draft is written to OUTPUT_DIR/draft: for "
    "--draft-kind medusa/eagle in the format vLLM's own method loads, speculative_config="
    "{'method': 'medusa' or 'eagle', 'model': 'OUTPUT_DIR/draft', 'num_speculative_tokens': K}.")


def train_parser() -> argparse.ArgumentParser:
    """The flat form, `chimera-train --target ... --output-dir ...`: training, or one of the
    modes --cache-only, --evaluate, --average."""
    p = argparse.ArgumentParser(
        prog="chimera-train", description=TRAIN_DESCRIPTION,
        epilog=f"Subcommands: chimera-train {{{','.join(SUBCOMMANDS)}}} --help "
               "(recipe: a whole recipe file, e.g. recipes/smollm2-chimera.toml).")
    add_training_arguments(p)
    g = p.add_argument_group("modes (the flat form; each is also a subcommand)")
    g.add_argument("--cache-only", action="store_true",
                   help="only cache the target's outputs over the data (shared by later runs)")
    g.add_argument("--evaluate", metavar="DRAFT_DIR",
                   help="do not train: report DRAFT_DIR's per-head accuracy on --val-data "
                        "(written to OUTPUT_DIR/evaluation.json)")
    g.add_argument("--average", metavar="DRAFT_DIR,DRAFT_DIR[,...]",
                   help="do not train: write the weighted mean of these drafts' weights (same "
                        "design and vocabulary, e.g. drafts continued from one draft on "
                        "different data) to OUTPUT_DIR/draft, a model soup")
    g.add_argument("--average-weights", metavar="W,W[,...]",
                   help="one positive weight per --average draft (default: equal)")
    return p


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainingSettings flag (train, cache, evaluate and the flat form share them)."""
    p.add_argument("--target", required=True,
                   help="a prepared target's name (`chimera-prepare target NAME`) or a Hugging Face folder")
    p.add_argument("--output-dir", required=True, help="checkpoints, final draft, metrics, plot")
    p.add_argument("--train-data", help="JSONL of conversations or token rows, or several "
                                        "separated by commas (one hidden-state cache each, so "
                                        "adding a file reuses the others'; default: the "
                                        "prepared ShareGPT train split)")
    p.add_argument("--val-data", help="held-out JSONL (default: the prepared validation split; "
                                      "'none' to skip validation)")
    p.add_argument("--cache-dir", help="cache root for prepared data and hidden states")
    _draft_arguments(p.add_argument_group("draft"))
    _data_arguments(p.add_argument_group("data"))
    _optimisation_arguments(p.add_argument_group("optimisation"))
    _run_arguments(p.add_argument_group("run"))


def _draft_arguments(g) -> None:
    g.add_argument("--draft-kind", choices=("chimera", "medusa", "eagle"), default=_default("draft_kind"),
                   help="chimera (default); medusa: Medusa-1 heads (ResidualBlock + own LM head "
                        "each) on the target's last hidden state; eagle: EAGLE-1 (fc + one Llama "
                        "layer, Llama targets), regression onto h_{t+1} + cross-entropy")
    g.add_argument("--num-heads", type=int, default=_default("num_heads"),
                   help="K: Chimera's or Medusa's heads, EAGLE's validated draft steps")
    g.add_argument("--no-trigram-encoder", action="store_true", help="ablation: no trigram encoder")
    g.add_argument("--no-context-encoder", action="store_true",
                   help="ablation: no full-context encoder (Medusa-style heads)")
    g.add_argument("--sequential-heads", action="store_true",
                   help="Chimera: head i also reads the embedding of the token before its own "
                        "target (Hydra; x_{t+1} for head 0, head i-1's draft after it)")
    g.add_argument("--init-from", metavar="DRAFT_DIR",
                   help="start from this saved Chimera draft's weights (a run's draft/ folder "
                        "or a shipped draft) to train it on further; fresh optimizer and "
                        "schedule; pass the options it was trained with")
    g.add_argument("--draft-vocab-size", type=int,
                   help="reduced draft vocabulary: the heads of Chimera or Medusa project onto "
                        "the N tokens the target predicts most often (Medusa in vLLM: with "
                        "--medusa-shared-lm-head); not for EAGLE, which reads the target's LM head; "
                        "with --init-from, more than the saved draft's adds the data's next most "
                        "frequent tokens (with the target's LM-head rows)")
    g.add_argument("--draft-intermediate-size", type=int,
                   help="encoder-layer MLP width (Chimera; EAGLE: its layer's); with "
                        "--init-from, wider than the saved draft's grows it (same function at step 0)")
    g.add_argument("--head-intermediate-size", type=int,
                   help="Chimera: hidden width of each residual head R_i (default: the hidden "
                        "size); with --init-from, wider than the saved draft's grows it")
    g.add_argument("--encoder-layers", type=int,
                   help="Chimera: depth of the full-context encoder (default 1, the paper's); "
                        "with --init-from, more than the saved draft's stacks new layers that "
                        "start as the identity")
    g.add_argument("--target-layer-ids", metavar="IDS",
                   help="Chimera: also read the target's residual stream at these layers "
                        "(EAGLE-3's lesson), comma-separated (e.g. 2,15,27) or 'default' (vLLM's "
                        "EAGLE-3 choice: 2, L/2, L-3 of L layers); with --init-from, a draft "
                        "that read none starts from exactly its function")
    g.add_argument("--medusa-layers", type=int, help="ResidualBlock layers per Medusa head (default 1)")
    g.add_argument("--medusa-shared-lm-head", action="store_true",
                   help="Medusa heads share the target's frozen LM head (vLLM's original_lm_head) "
                        "instead of training a copy each; with --draft-vocab-size they share one "
                        "trainable reduced LM head")


def _data_arguments(g) -> None:
    g.add_argument("--max-length", type=int, default=_default("max_length"))
    g.add_argument("--train-tokens", type=int, help="training budget in tokens (default: all)")
    g.add_argument("--val-tokens", type=int, default=_default("val_tokens"))
    g.add_argument("--loss-on", choices=("responses", "all"), default=_default("loss_on"))
    g.add_argument("--cache-precision", choices=("fp32", "bf16"), default=_default("cache_precision"),
                   help="the target's forward over the training data when caching it (bf16: "
                        "2-3x faster on CPUs with AMX; validation data is always fp32)")


def _optimisation_arguments(g) -> None:
    g.add_argument("--epochs", type=float, default=_default("epochs"))
    g.add_argument("--batch-size", type=int, default=_default("batch_size"),
                   help="sequences per optimizer step over all processes")
    g.add_argument("--micro-batch-size", type=int, default=_default("micro_batch_size"))
    g.add_argument("--lr", type=float, default=_default("lr"))
    g.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    g.add_argument("--warmup-ratio", type=float, default=_default("warmup_ratio"))
    g.add_argument("--head-weights", type=lambda s: [float(x) for x in s.split(",")],
                   help="comma-separated loss weight per head (default 0.8**i)")
    g.add_argument("--loss-positions-fraction", type=float, metavar="F",
                   help="cheaper steps: take the heads' loss on a random share F of each "
                        "sequence's labelled positions, drawn anew each step (default: all; "
                        "validation always scores all); chimera and medusa")
    g.add_argument("--skip-lookup-matches", type=int, metavar="MIN_MATCH",
                   help="train the heads only where vLLM's context lookup with this min_match "
                        "(its default: 2) finds no match, the only positions where they draft "
                        "when the lookup is on (default: every position); chimera and medusa")
    g.add_argument("--kl-weight", type=float, default=_default("kl_weight"),
                   help="weight of KL from the target's next-token distribution per head "
                        "(Medusa-2's self-distillation; default 0: off)")
    g.add_argument("--regression-weight", type=float, default=_default("regression_weight"),
                   help="weight of the smooth-L1 regression of each head's state onto the "
                        "target's h_{t+1+i} (EAGLE's; default 0: off; chimera and medusa)")
    g.add_argument("--autocast", choices=("auto", "bf16", "off"), default=_default("autocast"),
                   help="bf16 autocast of the draft: auto (CUDA GPUs with bf16), bf16 (also "
                        "CPUs with AMX / AVX-512-BF16), off (fp32)")
    g.add_argument("--seed", type=int, default=_default("seed"))


def _run_arguments(g) -> None:
    g.add_argument("--save-every", type=int, default=_default("save_every"))
    g.add_argument("--eval-every", type=int,
                   help="validate every N steps (log.jsonl: step, seconds, cpu_seconds, "
                        "per-head accuracy; default: at the end only)")
    g.add_argument("--stop-at-step", type=int, help="stop (resumably) after this step")
    g.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    g.add_argument("--device", default=_default("device"))
    g.add_argument("--num-threads", type=int, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true")


def _default(name: str):
    """TrainingSettings' default for field `name` (the flags' defaults)."""
    return TrainingSettings.__dataclass_fields__[name].default


def target_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """--target as a folder: a prepared target's (by name), or the folder given."""
    prepared = target_dir(args.target, args.cache_dir)
    is_name = Path(args.target).name == args.target
    if is_name and (prepared / "config.json").is_file():
        return str(prepared)
    if Path(args.target, "config.json").is_file():
        return args.target
    if is_name and not Path(args.target).exists():
        parser.error(f"target {args.target!r} is not prepared (no {prepared}): run "
                     f"`chimera-prepare target {args.target}`")
    parser.error(f"--target {args.target!r}: neither a prepared target name nor a folder "
                 f"with a config.json")


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainingSettings:
    target = target_folder(args, parser)
    sharegpt = sharegpt_dir(args.cache_dir)
    train_data = args.train_data or str(sharegpt / "train.jsonl")
    val_data = args.val_data or str(sharegpt / "validation.jsonl")
    if val_data == "none":
        val_data = None
    for name, paths in (("--train-data", train_data), ("--val-data", val_data)):
        for path in (paths.split(",") if paths is not None else []):
            if not Path(path).is_file():
                hint = " (run `chimera-prepare data`)" if str(sharegpt) in path else ""
                parser.error(f"{name}: no such file {path}{hint}")
    if args.init_from and not Path(args.init_from, "config.json").is_file():
        parser.error(f"--init-from {args.init_from!r}: no config.json there (not a saved draft)")
    overrides = {}
    if args.draft_vocab_size is not None:  # Chimera and Medusa; refused for EAGLE
        if args.draft_vocab_size <= 0:
            parser.error(f"--draft-vocab-size must be positive, got {args.draft_vocab_size}")
        overrides["draft_vocab_size"] = args.draft_vocab_size
    for flag, key in (("draft_intermediate_size", "intermediate_size"),
                      ("head_intermediate_size", "head_intermediate_size")):
        width = getattr(args, flag)
        if width is not None:
            if width <= 0:
                parser.error(f"--{flag.replace('_', '-')} must be positive, got {width}")
            overrides[key] = width  # (the peers refuse head_intermediate_size as unknown)
    if args.encoder_layers is not None:  # Chimera only; the peers refuse it as unknown
        if args.encoder_layers <= 0:
            parser.error(f"--encoder-layers must be positive, got {args.encoder_layers}")
        if args.encoder_layers > 1 and args.no_context_encoder:
            parser.error("--encoder-layers > 1 needs the context encoder (not --no-context-encoder)")
        overrides["num_encoder_layers"] = args.encoder_layers
    if args.target_layer_ids:  # Chimera only; the peers refuse it as an unknown override
        overrides["target_layer_ids"] = parse_target_layer_ids(args.target_layer_ids, target, parser)
    if args.medusa_layers:
        overrides["num_layers"] = args.medusa_layers
    if args.medusa_shared_lm_head:
        overrides["shared_lm_head"] = True
    if args.sequential_heads:  # Chimera only; the peers refuse it as an unknown override
        overrides["sequential_heads"] = True
    try:
        return TrainingSettings(
            target=target, train_data=train_data, val_data=val_data, output_dir=args.output_dir,
            cache_dir=args.cache_dir, draft_kind=args.draft_kind, num_heads=args.num_heads,
            use_trigram_encoder=not args.no_trigram_encoder,
            use_context_encoder=not args.no_context_encoder, draft_overrides=overrides,
            init_from=args.init_from,
            max_length=args.max_length, train_tokens=args.train_tokens, val_tokens=args.val_tokens,
            loss_on=args.loss_on, cache_precision=args.cache_precision, epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size, lr=args.lr, weight_decay=args.weight_decay,
            warmup_ratio=args.warmup_ratio, head_weights=args.head_weights,
            loss_positions_fraction=args.loss_positions_fraction,
            skip_lookup_matches=args.skip_lookup_matches, kl_weight=args.kl_weight,
            regression_weight=args.regression_weight, autocast=args.autocast,
            seed=args.seed,
            save_every=args.save_every, eval_every=args.eval_every, stop_at_step=args.stop_at_step,
            resume=not args.no_resume, device=args.device, num_threads=args.num_threads,
            progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))


def parse_target_layer_ids(value: str, target: str, parser: argparse.ArgumentParser) -> list[int]:
    """--target-layer-ids: "2,15,27" or "default", checked against the target's layers."""
    config = AutoConfig.from_pretrained(target)
    num_layers = (getattr(config, "text_config", None) or config).num_hidden_layers
    if value == "default":
        return list(default_target_layer_ids(num_layers))
    try:
        layer_ids = [int(x) for x in value.split(",")]
    except ValueError:
        parser.error(f"--target-layer-ids {value!r}: comma-separated layer numbers or 'default'")
    problem = target_layer_ids_problem(layer_ids, num_layers)
    if problem:
        parser.error(f"--target-layer-ids {problem}")
    return layer_ids


def subcommand_parser() -> argparse.ArgumentParser:
    """`chimera-train SUBCOMMAND ...`: one subcommand per job the scripts used to do inline."""
    p = argparse.ArgumentParser(prog="chimera-train", description=TRAIN_DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recipe", help="run a recipe file's stages (resumable)")
    r.add_argument("recipe_file", help="a recipe, e.g. recipes/smollm2-chimera.toml")
    r.add_argument("--stage", action="append", dest="stages", metavar="NAME",
                   help="run only this stage (repeatable; default: every stage in order)")
    r.add_argument("--runs-dir", help="where the stages' runs go (default: $CHIMERA_RUNS_DIR, "
                                      "else CACHE/runs)")
    r.add_argument("--cache-dir", help="cache root for prepared targets, data and hidden states")
    r.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's)")
    r.add_argument("--ship", action="store_true",
                   help="write the last stage's draft to the recipe's `ship` folder (fp16, "
                        "keeping the step-aside schedules measured there)")
    r.add_argument("--dry-run", action="store_true",
                   help="print each stage's settings and data; run nothing")
    for name, text in (("train", "train a draft (the flat form's default)"),
                       ("cache", "only cache the target's outputs over the data")):
        add_training_arguments(sub.add_parser(name, help=text, description=TRAIN_DESCRIPTION))
    e = sub.add_parser("evaluate", help="per-head accuracy of a saved draft on --val-data "
                                        "(OUTPUT_DIR/evaluation.json)")
    e.add_argument("draft_dir", help="a saved draft (Chimera, or an exported Medusa/EAGLE peer)")
    add_training_arguments(e)
    a = sub.add_parser("average", help="the weighted mean of drafts' weights (a model soup) "
                                       "in OUTPUT_DIR/draft")
    a.add_argument("draft_dirs", nargs="+", metavar="DRAFT_DIR")
    a.add_argument("--target", required=True, help="a prepared target's name or a folder")
    a.add_argument("--output-dir", required=True)
    a.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one positive weight per draft (default: equal)")
    a.add_argument("--cache-dir")
    x = sub.add_parser("export", help="a trained draft in its shipped form: one file, half "
                                      "precision")
    x.add_argument("src", help="a trained draft folder (a run's OUTPUT_DIR/draft)")
    x.add_argument("dst", help="the folder to write (e.g. vllm_chimera/drafts/NAME)")
    x.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    x.add_argument("--keep-schedules-from", metavar="DRAFT_DIR",
                   help="carry this draft's measured step-aside schedules (e.g. the shipped "
                        "draft being replaced; default: DST when it holds a draft)")
    return p


def train_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        parser = subcommand_parser()
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args, parser)
    return flat_main(argv)


def flat_main(argv: list[str]) -> int:
    """`chimera-train --target ... --output-dir ...` with --cache-only / --evaluate / --average."""
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.average_weights and not args.average:
        parser.error("--average-weights needs --average")
    if args.average and (args.evaluate or args.cache_only):
        parser.error("--average is a run of its own: evaluate its draft afterwards")
    if args.average:  # (no data, so before the settings, which check it)
        try:
            weights = ([float(w) for w in args.average_weights.split(",")]
                       if args.average_weights else None)
        except ValueError as e:
            parser.error(f"--average-weights: {e}")
        return average_drafts_main(args, parser, [d for d in args.average.split(",") if d], weights)
    if args.evaluate:
        args.draft_dir = args.evaluate
        return evaluate_main(args, parser)
    return (cache_main if args.cache_only else training_main)(args, parser)


def training_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    train(settings_from_args(args, parser))
    return 0


def cache_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cache_only(settings_from_args(args, parser))
    return 0


def evaluate_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = settings_from_args(args, parser)
    if settings.val_data is None:
        parser.error("evaluating a draft needs validation data (--val-data)")
    evaluate_to_file(settings, args.draft_dir)
    return 0


def average_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return average_drafts_main(args, parser, args.draft_dirs, args.weights)


def average_drafts_main(args: argparse.Namespace, parser: argparse.ArgumentParser,
                        draft_dirs: list[str], weights: list[float] | None) -> int:
    """The model soup of `draft_dirs` in OUTPUT_DIR/draft (training.checkpointing)."""
    target_config = AutoConfig.from_pretrained(target_folder(args, parser))
    try:
        average_into(draft_dirs, weights, target_config, args.output_dir)
    except (ValueError, ChimeraCheckpointError) as e:
        parser.error(f"average: {e}")
    return 0


def export_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not Path(args.src, "config.json").is_file():
        parser.error(f"export: no draft in {args.src} (no config.json)")
    try:
        export_draft_keeping_schedules(args.src, args.dst, args.keep_schedules_from or args.dst,
                                       DTYPES[args.dtype])
    except (ValueError, ChimeraCheckpointError) as e:
        parser.error(f"export: {e}")
    return 0


def recipe_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run (or with --dry-run, print) a recipe file's stages."""
    runs = args.runs_dir or os.environ.get("CHIMERA_RUNS_DIR") or cache_dir(args.cache_dir) / "runs"
    try:
        recipe = load_recipe(args.recipe_file)
        stages = [recipe.stage(name) for name in args.stages or [s.name for s in recipe.stages]]
        if args.dry_run:
            for stage in stages:
                table = {**recipe.settings, **precision_settings(recipe.precision), **stage.settings,
                         "train_data": [str(d) for d in stage.train_data],
                         "init_from": stage_init(recipe, stage, Path(runs)) or "scratch"}
                print(dumps_table(table, f"stages.{stage.name}"))
            return 0
        run_recipe(recipe, runs, args.cache_dir, args.stages, args.num_threads, args.ship)
    except RecipeError as e:
        parser.error(str(e))
    return 0


COMMANDS = {"recipe": recipe_main, "train": training_main, "cache": cache_main,
            "evaluate": evaluate_main, "average": average_main, "export": export_main}


if __name__ == "__main__":  # torchrun -m vllm_chimera.commands.train ... runs training
    sys.exit(train_main())
