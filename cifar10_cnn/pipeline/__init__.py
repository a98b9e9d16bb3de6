"""What each entry point does, one module per step. The scripts in steps/ parse their arguments and
call `<step>.run` inside `tracking.run_step`, which owns the MLflow run's start, status and exit code.

Steps hand results to each other only through the tracking store: a step receives the run id of the
step before it and reads that run's artifacts, params and tags. Each module imports only what its step
needs, so that `main` and `ingest` start without loading torch.
"""
