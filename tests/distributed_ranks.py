"""Started by tests/test_distributed.py under ``torchrun --nproc_per_node N``: trains runs of
a study config on N ranks (gloo, one CPU thread each), one process group for all of them
(one launch: torch is imported once per rank, not once per run).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_ranks.py \
        CONFIG DEST JOBS_JSON

``JOBS_JSON``: ``[[run_id, folder, stop_after], ...]``; each run trains into ``DEST/folder``
(``stop_after``: ``null``, or stop after that many steps as a killed job would, so that the
next job with the same folder resumes it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from harness.plan.study import plan_from_file
from harness.run.train import train_run


def main() -> None:
    config_path, dest, jobs = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group(backend="gloo")
    config, plan = plan_from_file(config_path)
    for run_id, folder, stop_after in jobs:
        train_run(config, plan.run(run_id), dest / folder, progress=False, stop_after=stop_after)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
