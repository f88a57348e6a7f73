"""``gift-quant`` command line: recover, quantize, eval, report."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__, devices, pipeline
from .checkpoint import CheckpointError
from .devices import DeviceError
from .evaluate import PAPER_TASKS
from .recipe import EvalSpec, RecipeError
from .recipe_file import load_recipe
from .rundir import RunError
from .sources import SourceError
from .stages import STAGES
from .train import TrainingError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gift-quant", description=__doc__, epilog="stdout carries only the final "
                                     "JSON; logs and progress go to stderr. Exit codes: 0 done, 1 runtime failure, "
                                     "2 usage, recipe or input error.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    levels = argparse.ArgumentParser(add_help=False)
    levels.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-v: debug)")
    levels.add_argument("-q", "--quiet", action="count", default=0, help="fewer log lines (-q: warnings only, "
                        "-qq: errors only)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[levels], **kw)

    for name, help_ in [("recover", "run the whole pipeline of a recipe (quantize, train, export, evaluate, report)"),
                        ("quantize", "only quantize (GPTQ/RTN + salient columns) and print perplexity"),
                        ("plan", "print each stage's expected peak memory for the recipe's model on its device "
                                 "(from the model's config; nothing is loaded)")]:
        p = add(name, help=help_)
        p.add_argument("recipe", help="recipe YAML, or the name of a shipped recipe (e.g. smollm2-135m-instruct-w3)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set quant.bits=4 (repeatable)")
        p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (the same as --set device=...)")
        if name == "plan":
            p.add_argument("--capacity", default=None, metavar="SIZE",
                           help="plan against a device of this memory (e.g. 24GiB, 80GB) that this machine need "
                                "not have: --device cuda --capacity 24GiB plans a 24 GiB GPU without one")
        if name != "plan":
            p.add_argument("--trust-remote-code", action="store_true",
                           help="confirm a recipe's model.trust_remote_code: true (runs the model repository's code)")
        if name == "recover":
            p.add_argument("--from", dest="from_stage", choices=list(STAGES), help="redo this stage and every later one")
    p = add("eval", help="zero-shot tasks (lm-eval) and perplexity of a model or exported folder")
    p.add_argument("model", help="hub id, folder (e.g. runs/<name>/export/dense) or pkg://... .gguf")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated lm-eval tasks ('' for none)")
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences a forward (perplexity and lm-eval)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (lm-eval's task default if unset)")
    p.add_argument("--device", default="cpu", help="where the model loads and runs: cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="of the unquantized tensors; auto: the one the folder's config.json names (float32 where "
                        "it names none)")
    p.add_argument("--ppl-data", default=EvalSpec.model_fields["ppl_data"].default,
                   help="held-out text for perplexity ('' for none)")
    p.add_argument("--ppl-seq-len", type=int, default=2048, help="tokens a perplexity window")
    p.add_argument("--ppl-max-windows", type=int, default=None, help="score at most this many windows")
    p.add_argument("--out", default=None, help="folder for lm-eval's results JSON and our summary")
    sub.add_parser("lm-eval", add_help=False,
                   help="lm-eval's own command line with the offline tasks and the gift format available; for "
                   "multi-GPU evaluation: accelerate launch -m gift_quant.cli lm-eval --model hf --model_args "
                   "pretrained=FOLDER --tasks gq_paper6 (every argument goes to lm-eval)")
    p = add("verify", help="check a run, stage or export folder against its recorded sha256s and, for a "
                                      "gift export, every tensor; exits 1 with what is wrong")
    p.add_argument("folder", help="runs/<name>, a stage folder in it, or an export folder")
    p = add("report", help="build a comparison report from one or more run folders")
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    p.add_argument("--out", default="report", help="output folder")
    return parser


def _eval(args) -> dict:
    import torch

    from .data import text_windows
    from .evaluate import perplexity, zero_shot
    from .exports import load
    from .layers import merge_to_dense

    model, tok = load(args.model, None if args.dtype == "auto" else getattr(torch, args.dtype), args.device)
    merge_to_dense(model)  # a gift folder's layers as plain linears: no dequantization on every forward
    summary = {"model": args.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
               "device": args.device, "limit": args.limit, "seconds": {}}
    if args.ppl_data:
        t = time.time()
        windows = text_windows(tok, args.ppl_data, args.ppl_seq_len, args.ppl_max_windows)
        summary["ppl"] = perplexity(model, windows, args.batch_size)
        summary["ppl_windows"] = [len(windows), args.ppl_seq_len]
        summary["seconds"]["ppl"] = round(time.time() - t, 1)
    tasks = [t for t in args.tasks.split(",") if t]
    raw = None
    if tasks:
        t = time.time()
        summary["tasks"], raw = zero_shot(model, tok, tasks, args.limit, args.batch_size, args.num_fewshot, args.device)
        summary["seconds"]["tasks"] = round(time.time() - t, 1)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if raw is not None:
            (out / "lm_eval_results.json").write_text(json.dumps(raw, indent=2, default=str))
    return summary


def _lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI, unchanged, with the offline task mirrors (filled for this machine) added beside a
    user's own ``--include_path``; returns lm-eval's exit code. ``import gift_quant`` has registered the
    ``gift`` format with transformers, so ``--model hf --model_args pretrained=<gift folder>`` loads it;
    lm-eval handles data parallelism itself when started by ``accelerate launch``."""
    import shutil
    import tempfile

    from .evaluate import offline_tasks, require

    require("lm_eval", "eval")
    from lm_eval.__main__ import cli_evaluate

    argv, user = list(argv), None
    for i, a in enumerate(argv):
        if a == "--include_path" and i + 1 < len(argv):
            user = argv.pop(i + 1)
            argv.pop(i)
            break
        if a.startswith("--include_path="):
            user = argv.pop(i).partition("=")[2]
            break
    with tempfile.TemporaryDirectory() as tmp:
        offline_tasks(Path(tmp) / "gift_quant")
        if user:  # lm-eval takes one folder: the user's tasks are copied beside ours
            shutil.copytree(user, Path(tmp) / "user", symlinks=False)
        sys.argv = ["lm-eval", "run", *argv, "--include_path", tmp]
        try:
            cli_evaluate()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, options included
        return _lm_eval(argv[1:])
    args = _parser().parse_args(argv)
    level = logging.INFO + 10 * (args.quiet - args.verbose)
    logging.basicConfig(level=max(logging.DEBUG, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = sys.stdout
    # stdout carries the final JSON only: whatever a library prints on the way (gptqmodel's banner when
    # peft imports it, lm-eval's tables) goes to stderr with the logs
    with contextlib.redirect_stdout(sys.stderr):
        code, result = _run(args)
    if code == 0:
        print(json.dumps(result, indent=2), file=out)
    return code


def _run(args) -> tuple[int, dict | None]:
    """The command's exit code and its result."""
    try:
        if args.command == "eval":
            result = _eval(args)
        elif args.command == "verify":
            from .verify import verify

            result = {"folder": args.folder, "problems": verify(Path(args.folder))}
        elif args.command == "report":
            from .report import write_report

            result = {"report": str(write_report([Path(r) for r in args.runs], Path(args.out)))}
        else:
            recipe = load_recipe(args.recipe, args.set + ([f"device={args.device}"] if args.device else []))
            if args.command == "plan":
                from .plan import format_plan

                if args.capacity is None:
                    device, memory = devices.resolve(recipe.device), None
                else:
                    device, memory = devices.named(recipe.device), devices.parse_bytes(args.capacity)
                result = pipeline.plan_recipe(recipe, device, memory)
                print(format_plan(result), file=sys.stderr)
            elif args.command == "quantize":
                result = pipeline.quantize(recipe, args.trust_remote_code)
            else:
                result = {"report": str(pipeline.recover(recipe, args.from_stage, trust_remote_code=args.trust_remote_code))}
    except (RecipeError, RunError, SourceError, DeviceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except (CheckpointError, TrainingError, ImportError, OSError) as e:  # damaged files, a diverged run, a missing extra, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1, None
    if args.command == "verify" and result["problems"]:
        print("\n".join(result["problems"]), file=sys.stderr)
        return 1, result
    return 0, result


if __name__ == "__main__":
    sys.exit(main())
