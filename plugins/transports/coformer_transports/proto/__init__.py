"""Generated protobuf/gRPC modules for the CoFormer worker service (see coformer.proto, regenerate.py)."""
