"""Entry points: ``python -m harness <command>`` (:mod:`.main`, with the stage commands in
:mod:`.stages`, :mod:`.outputs` and :mod:`.bench`) and what the Snakefile reads at parse
time (:mod:`.snakefile`). May import any stage."""

from harness.cli.main import main

__all__ = ["main"]
