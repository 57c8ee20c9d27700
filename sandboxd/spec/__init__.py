"""The spec layer: YAML unit files become frozen, checked dataclasses."""
