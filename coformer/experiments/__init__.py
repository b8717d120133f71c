"""Experiments built on the stages: the demo flow, benchmarks, baselines, device-count sweeps, the network testbed."""
