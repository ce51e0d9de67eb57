"""The analysis stage: everything built from stored results, never training. The one results
reader (:mod:`.results`), the bootstrap statistics and the study's comparisons
(:mod:`.stats`, :mod:`.comparisons`), expert sharing (:mod:`.sharing`), the per-run
summary (:mod:`.summary`), tables (:mod:`.tables`) and figures (:mod:`.figures`), rendered
once (:mod:`harness.common.render`) and declared once in the outputs registry (:mod:`.outputs`)."""
