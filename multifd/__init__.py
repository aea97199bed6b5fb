"""Pages and packets: the multifd wire format and the sender and receiver worker pools."""
