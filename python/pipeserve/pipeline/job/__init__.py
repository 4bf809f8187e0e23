"""A job: its columns, endpoints, templates and schemas, read from a job file and checked."""
