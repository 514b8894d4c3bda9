"""The worker: data store, task execution, transfers between workers, the worker process."""
