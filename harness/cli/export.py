"""``python -m harness export RUN_DIR --out DIR [--merge]``: a trained run as a peft adapter
folder (LoRA), a self-contained mixture folder for ``harness.load_exported``, or a merged
transformers model (:mod:`harness.run.export`)."""

from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> int:
    # imported here, as every command's engine: `python -m harness --help` stays fast
    from harness.run.export import ExportError, export_run

    try:
        result = export_run(args.run_dir, args.out, merge=args.merge, trust_plugins=args.trust_plugins)
    except (ExportError, FileNotFoundError) as exc:  # not an export-able run folder, or no weights
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = {
        "peft": "a peft adapter folder: PeftModel.from_pretrained(<base model>, folder)",
        "mixture": "load it with harness.load_exported(folder)",
        "merged": "a full model: AutoModelForCausalLM.from_pretrained(folder)",
    }[result.kind]
    print(f"wrote {result.folder} ({result.method}, {how})")
    if result.kind != "merged":
        print(f"base model it needs: {result.base_model}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "export",
        help="a trained run as a peft adapter folder (LoRA), a self-contained folder that "
        "harness.load_exported turns into a transformers model (mixtures), or with --merge a "
        "full model with the update merged into the base weights (LoRA, MultiLoRA)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (<out_dir>/runs/<run id>) with its weights")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder to write (never overwritten)")
    p.add_argument("--merge", action="store_true",
                   help="merge the update into the base weights (methods with one fixed matrix per "
                   "layer: LoRA, MultiLoRA; routed methods are refused)")
    p.add_argument("--trust-plugins", action="store_true",
                   help="allow importing the plugin module a non-built-in method comes from (runs its code)")
    p.set_defaults(func=cmd_export)
