"""gRPC transport: servicers, status mapping, proto <-> domain conversion. Never imports torch."""
