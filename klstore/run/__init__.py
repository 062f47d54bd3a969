"""Running experiments: the plan (run lifecycle), the worker (one model copy) and the Ray runner.

plan     run id, shards, resume, the `runs` row; the in-process executor
records  engine results -> store rows
worker   one loaded model computing and writing shards (no ray import)
runner   the Ray executor: actors, scheduling, retries, progress (the only ray importer)
"""
