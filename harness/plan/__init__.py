"""The plan stage: what a study will do, decided before any job runs. The config and its
schema (:mod:`.config`), the runs and components with their settings fixed once
(:mod:`.study`), the budget solver and its table (:mod:`.budget`, :mod:`.budget_table`),
the checks the Snakefile runs (:mod:`.checks`), where every run stands (:mod:`.status`)
and the GPU-memory estimate (:mod:`.memory`)."""
