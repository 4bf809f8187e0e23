"""A rank process: its main, the PP loops, the transport between stages, stage 0's request intake."""
