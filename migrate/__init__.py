"""One migration job: parameters, state machine, precopy, guest stand-in, CLI, daemon."""
