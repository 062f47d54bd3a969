"""Ray job entry point:

    ray job submit --working-dir . -- python jobs/kl_sweep.py jobs/demo.yaml [--store s3://...]

Runs `klstore run CONFIG` inside the job; Ray sets RAY_ADDRESS for it, so the
runner joins the cluster instead of starting a local Ray.
"""

import sys

from klstore.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
