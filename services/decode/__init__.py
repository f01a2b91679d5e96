"""Decode service: receives KV pushes and runs the continuous-batching decode loop."""
