"""Optional integrations of the fused loss into other trainers.

Each submodule imports its trainer library lazily and is installed by its own extra:

* :mod:`prefix_rft.integrations.trl` -- TRL's ``GRPOTrainer`` (``pip install "prefix-rft[trl]"``).
"""
