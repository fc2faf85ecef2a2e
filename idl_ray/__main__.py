"""``python -m idl_ray`` runs the ``idl-ray`` command."""

from idl_ray.cli import main

raise SystemExit(main())
