"""The tune stage's choice: per tuned method x variant, the learning rate whose runs scored
best on the validation split.

Every tuned method x variant (``StudyPlan.tuning``) was trained at each rate of
``tune.lrs`` and each tuning seed on the training items minus the validation split, and
scored by lm-eval on that split (the suite score: the mean over tasks of each task's
primary metric). The rule (``tune.rule``):

* ``best_mean``: the rate with the highest validation score, averaged over the tuning seeds;
  a tie (equal to 1e-12) goes to the smaller rate.

``{out_dir}/tuning/rates.json`` holds the choice and every score it was made from; the final
runs read their rate from it (its job waits for this one), and the tuning table shows it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from harness.common.files import atomic_write_json, read_json
from harness.common.provenance import provenance
from harness.plan.study import row_key


def validation_scores(plan) -> dict[str, dict[float, list[float]]]:
    """``{row key: {rate: [validation suite score of each tuning seed]}}`` from the tuning
    runs' ``metrics.json``; a missing one is named."""
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    missing = []
    for run in plan.tuning:
        path = plan.run_dir(run) / "metrics.json"
        if not path.exists():
            missing.append(run.run_id)
            continue
        scores[row_key(run.method, run.tag)][float(run.settings.lr)].append(float(read_json(path)["suite_acc"]))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} tuning run(s) have no validation score yet ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): run the tune stage first (snakemake runs it)"
        )
    return {key: dict(by_rate) for key, by_rate in scores.items()}


def choose(scores: dict[float, list[float]], rule: str = "best_mean") -> float:
    """The chosen rate of one method x variant under ``rule``."""
    if rule != "best_mean":
        raise ValueError(f"tune.rule = {rule!r}; valid: best_mean")
    means = {lr: sum(v) / len(v) for lr, v in scores.items()}
    best = max(means.values())
    return min(lr for lr, m in means.items() if m >= best - 1e-12)


def choose_rates(plan) -> dict[str, Any]:
    """Choose every tuned method x variant's rate and write ``tuning/rates.json``."""
    tune = plan.config["tune"]
    rates = {}
    for key, by_rate in sorted(validation_scores(plan).items()):
        rates[key] = {
            "lr": choose(by_rate, tune["rule"]),
            "validation": {f"{lr:g}": [round(v, 6) for v in values] for lr, values in sorted(by_rate.items())},
        }
    record = {
        "study": plan.config["study"],
        "rule": tune["rule"],
        "lrs": tune["lrs"],
        "seeds": tune["seeds"],
        "validation_fraction": tune["validation_fraction"],
        "rates": rates,
        "provenance": provenance(),
    }
    atomic_write_json(plan.rates_path, record)
    return record
