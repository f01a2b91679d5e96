"""Benchmarks: serving (pdserve bench) and KV transfer overlap."""
