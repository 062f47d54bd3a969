"""Ray job entry point for the report (e.g. on a schedule):

    ray job submit --working-dir . -- python jobs/report.py reports/default.yaml --store s3://bucket/klstore

Runs `klstore report SPEC ...` in the job's driver: the report reads the store's
views (it never recomputes KL) and only redraws figures whose inputs changed.
"""

import sys

from klstore.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
