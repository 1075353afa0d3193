"""A run's life around the loop: built before step 0, saved, resumed, one per directory.

* :mod:`~prefix_rft.run.setup` -- the typed :class:`Run` and :func:`start_run`: model,
  tokenizer, optimizer, schedule, engine, loss, seeds (from :mod:`prefix_rft.runtime`).
* :mod:`~prefix_rft.run.checkpoint` -- atomic checkpoints, exact resume, signal handling.
* :mod:`~prefix_rft.run.train_io` -- the loop's saves (a step's, after a crash) and its
  periodic evaluation.
* :mod:`~prefix_rft.run.runlock` -- one run per run directory.

Only the loop (:mod:`prefix_rft.train`) imports these.
"""
