"""The inference engine: requests, scheduling, KV cache, sampling, and the offline API."""
