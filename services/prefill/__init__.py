"""Prefill service: runs prompt forward passes and streams each layer's KV to a decode instance."""
