"""The supervisor: the state machine of every service and the collaborators it drives."""
