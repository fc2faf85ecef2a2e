"""End-to-end jobs behind the ``idl-ray`` command: each is a config dataclass and a ``run`` function
returning a JSON-friendly report, so the CLI, ``ray job submit`` and Python callers share one path."""
