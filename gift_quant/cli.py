"""``gift-quant`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .recipe import RecipeError, load_recipe
from .sources import SourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gift-quant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("recover", "run the whole pipeline of a recipe (quantize, train, export, evaluate, report)"),
                        ("quantize", "quantize a model (GPTQ/RTN + salient columns) and print perplexity")]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="recipe YAML (see recipes/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set quant.bits=4 (repeatable)")
        if name == "recover":
            p.add_argument("--from", dest="from_stage", choices=["quantize", "train", "export", "evaluate", "report"],
                           help="redo this stage and every later one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import pipeline

    try:
        recipe = load_recipe(args.recipe, args.set)
        if args.command == "quantize":
            summary = pipeline.quantize(recipe)
        else:
            summary = {"report": str(pipeline.recover(recipe, args.from_stage))}
    except (RecipeError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
