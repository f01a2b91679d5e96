"""Generated protobuf and gRPC modules for the pdserve.v1 contracts (``make proto``)."""
