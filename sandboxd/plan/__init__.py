"""The plan layer: pure functions from a spec and host facts to the exact steps of a launch."""
