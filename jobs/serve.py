"""The HTTP endpoint as a Ray job (add --detach to leave it running):

    ray job submit --working-dir . -- python jobs/serve.py [spam-gpt serve options]

Defaults come from ray_config.yaml (section `common`, then `serve`); options given here
win. Takes every option of `spam-gpt serve`, plus `--config PATH` for another file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from spam_gpt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("serve", sys.argv[1:]))
