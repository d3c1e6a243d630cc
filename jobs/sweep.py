"""A sweep of training runs (Ray Tune) as a Ray job:

    ray job submit --working-dir . -- python jobs/sweep.py [spam-gpt sweep options]

Defaults come from ray_config.yaml (section `common`, then `sweep`); options given here
win. Takes every option of `spam-gpt sweep`, plus `--config PATH` for another file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from spam_gpt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("sweep", sys.argv[1:]))
