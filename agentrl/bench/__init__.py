"""Benchmarks that need agentrl's real parts end to end (`agentrl bench ...`)."""
