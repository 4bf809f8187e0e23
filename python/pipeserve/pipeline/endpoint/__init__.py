"""The endpoints a job talks to: the HTTP client, adaptive concurrency, an in-process mock."""
