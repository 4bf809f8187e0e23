"""Typed messages between front ends and stage 0, their codec, and the sockets that carry them. No torch."""
