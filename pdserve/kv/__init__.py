"""KV cache on the wire: layout, chunking, validation on receipt, and transports.

``wire`` turns tensors into chunk bytes and back; ``assembly`` validates and
collects one transfer on the receiving side; ``transport`` is the interface
both ends program against; ``grpc_sender`` is the gRPC-streams producer.
"""
