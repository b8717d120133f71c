"""The defaults every stage and command starts from, kept in one place.

They name built-in plugins that a fresh install registers; each stage takes another name instead
(``--backbone``, ``--aggregator``, ``--strategy``, ``--devices``).
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
