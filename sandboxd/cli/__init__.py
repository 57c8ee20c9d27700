"""The command line and the control client."""
