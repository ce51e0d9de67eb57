"""Declare a change of a method's (or the toolkit's) code number-preserving, so the runs
trained under the older code are not retrained (``number_preserving.yaml``).

    python scripts/declare_number_preserving.py --method smora --why "one-process path unchanged; tests/test_oracles.py"
    python scripts/declare_number_preserving.py --method smora_paper --plugin examples.smora_paper_rate --why "..."
    python scripts/declare_number_preserving.py --toolkit --why "..."
    python scripts/declare_number_preserving.py --engine --why "..."   # lets tables compare across it
    python scripts/declare_number_preserving.py --list      # what would be stale, by method

The older digests are the ones the runs under ``results/`` recorded (``train.json``) that
differ from today's; the declaration is for today's digest only and lapses at the next
change of that code. ``status`` flags every run that counts through a declaration. Declare
only what a test shows: the same numbers, bit for bit, on the machine that trained them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.adapters import get_method, load_plugin  # noqa: E402
from harness.plan.study import NUMBER_PRESERVING, code_identity, method_source  # noqa: E402

HEADER = """\
# Code changes declared number-preserving (harness/plan/study.py: NUMBER_PRESERVING).
# A run whose train.json recorded a digest listed under `from` counts as trained by the code
# whose digest is `to`, as long as `to` is today's digest (the next change lapses it).
# `why` says what shows the numbers are the same. `status` flags every run that counts
# through a declaration. Written by scripts/declare_number_preserving.py.
"""


def recorded_digests(kind: str, name: str | None) -> dict[str, int]:
    """Digest -> number of committed runs that recorded it (``results/**/train.json``)."""
    found: dict[str, int] = {}
    for path in ROOT.glob("results/**/train.json"):
        train = json.loads(path.read_text())
        if kind == "method":
            if train.get("method") != name:
                continue
            digest = (train.get("method_source") or {}).get("digest")
        else:  # toolkit or engine
            digest = ((train.get("code") or {}).get(kind) or {}).get("digest")
        if digest:
            found[digest] = found.get(digest, 0) + 1
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--method", help="a registered method name")
    group.add_argument("--toolkit", action="store_true", help="the toolkit harness.adapters")
    group.add_argument("--engine", action="store_true",
                       help="the engine modules that train and score (harness.plan.study.ENGINE_MODULES)")
    group.add_argument("--list", action="store_true", help="methods whose committed runs recorded other code")
    parser.add_argument("--why", help="what shows the numbers are the same (required to declare)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this plugin first (a plugin method, e.g. examples.smora_paper_rate)")
    args = parser.parse_args()
    for plugin in args.plugin:
        load_plugin(plugin)
    if args.list:
        names = sorted({json.loads(p.read_text()).get("method") for p in ROOT.glob("results/**/train.json")} - {None})
        for name in names:
            try:
                current = method_source(get_method(name))["digest"]
            except KeyError:
                print(f"{name}: not registered here (a plugin?)")
                continue
            other = {d: n for d, n in recorded_digests("method", name).items() if d != current}
            if other:
                print(f"{name}: {sum(other.values())} committed run(s) recorded other code ({', '.join(other)}); "
                      f"today's digest {current}")
        return 0
    if not args.why:
        parser.error("--why is required: what shows the numbers are the same")
    kind, name = ("toolkit", None) if args.toolkit else ("engine", None) if args.engine else ("method", args.method)
    current = (code_identity()[kind]["digest"] if kind != "method" else method_source(get_method(name))["digest"])
    older = sorted(d for d in recorded_digests(kind, name) if d != current)
    if not older:
        print(f"every committed run of {name or 'the ' + kind} recorded today's digest {current}: nothing to declare")
        return 0
    data = yaml.safe_load(NUMBER_PRESERVING.read_text()) if NUMBER_PRESERVING.exists() else None
    data = data or {}
    entry = {"to": current, "from": older, "why": args.why}
    if kind == "method":
        data.setdefault("method", {})[name] = entry
    else:
        data[kind] = entry
    NUMBER_PRESERVING.write_text(HEADER + yaml.safe_dump(data, sort_keys=True, width=100))
    print(f"{NUMBER_PRESERVING.name}: {name or kind} {', '.join(older)} -> {current}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
