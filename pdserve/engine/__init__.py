"""Model execution: sampling, the prefill engine and the continuous-batching decode engine.

The engines know nothing about gRPC, tokenization or the network: they take
token ids and sampling parameters and produce tokens and KV tensors.
"""
