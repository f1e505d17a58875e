"""Helpers to run the real engine on loopback: the demo, tests and benchmarks use them."""
