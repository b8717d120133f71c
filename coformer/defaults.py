"""The defaults every stage and command starts from, kept in one place.

They name built-in plugins that a fresh install registers; each stage takes another name instead
(``--backbone``, ``--aggregator``, ``--strategy``, ``--devices``, ``--transport``).
"""

from __future__ import annotations

#: The embedded real model the demo and every stage use when no backbone is named.
BACKBONE = "bert"
#: The aggregator the demo and ``coformer calibrate`` train unless told otherwise.
AGGREGATOR = "mlp_fusion"
#: The search strategy of ``coformer plan``.
SEARCH_STRATEGY = "ax_gp_ei"
#: The seed's three heterogeneous devices (Table VII).
DEVICES = ("jetson-nano", "jetson-tx2", "orin-nano")
#: The transport ``coformer worker`` serves with and the testbed starts workers on (``--transport``).
TRANSPORT = "grpc"
#: The transport of workers living in the coordinator's own process (the demo, device-count sweeps).
LOCAL_TRANSPORT = "inproc"
#: Where ``coformer worker`` listens unless told otherwise: loopback only.
WORKER_LISTEN = "127.0.0.1:50051"
#: How ``coformer profile`` can summarise a shape's timing repeats (the first is its default).
TIMING_STATISTICS = ("median", "mean", "min")
