"""Training: a run's typed config (``config``), its encoders, training sources (``tasks``,
``sources``), objective and loss table (``objective``, ``loss_specs``), optimizer, state, the
pure step and its compiled form (``step``), selection, metrics, callbacks, the workdir's
guarantees (``workdir``), and the loop that tells the story of a run (``loop``)."""
