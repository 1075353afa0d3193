"""``prefix-rft plan``: will a config fit, and what to change if not.

* :mod:`~prefix_rft.planner.memory_model` -- per-component memory arithmetic from a model's
  ``config.json`` (the engines use it to report their own terms).
* :mod:`~prefix_rft.planner.plan` -- the update and rollout phases' peaks, fits, suggestions.
"""
