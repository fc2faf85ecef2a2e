"""End-to-end jobs behind the ``idl-ray`` command: each is a config dataclass and a ``run`` function
returning a JSON-friendly report, so the CLI, ``ray job submit`` and Python callers share one path.

- ``sim_job``: all of SIM (data, teacher, states, both stages, evaluation, a run directory);
  ``extract_job`` / ``solve_job`` / ``evaluate_job``: the same in steps; ``train_job``: gradient training.
- ``data_sources`` (``--data``), ``teacher_sources`` (``--teacher``), ``states_io`` (states on disk),
  ``run_dir`` (run directories), ``report`` (plots, report.md, console summary), ``metrics``.
"""
