"""What the policy is trained on: the mechanisms a config chooses and the set-up applies.

* :mod:`~prefix_rft.runtime.precision` -- :class:`PrecisionPolicy`: compute / stored-weight /
  reduce / export dtypes.
* :mod:`~prefix_rft.runtime.optim` -- the optimizer named by ``optim.name``.
* :mod:`~prefix_rft.runtime.lora` -- LoRA through peft; merging adapters into the weights.
* :mod:`~prefix_rft.runtime.offload` -- ``train.offload``: optimizer state and step in host RAM.
* :mod:`~prefix_rft.runtime.distributed` -- several GPUs: process groups, FSDP2, state dicts.
* :mod:`~prefix_rft.runtime.backends` -- the optional back-ends: who imports each and when.

These sit low: they import only :mod:`prefix_rft.checks`, :mod:`prefix_rft.errors` and each
other, so the config (which imports their ``Literal`` choices), the data sampler, the engines
and the update path may import them. Building a run from them is :mod:`prefix_rft.run`.
"""
