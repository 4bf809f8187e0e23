"""Stage 0's host-side decisions: admission, microbatches, preemption, finishing, the batch descriptor."""
