"""Fakes that speak real wire formats over real sockets (no patching of our code)."""
