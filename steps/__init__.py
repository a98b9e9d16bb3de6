"""One thin script per MLproject entry point: parse arguments, call the library inside an MLflow run."""
