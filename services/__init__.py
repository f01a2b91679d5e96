"""The three deployable pdserve services: gateway, prefill and decode."""
