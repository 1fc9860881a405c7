"""``python -m lowrank_ref ...`` (and ``torchrun ... -m lowrank_ref train ...``): the ``lowrank-ref`` command."""

from lowrank_ref.cli import main

raise SystemExit(main())
