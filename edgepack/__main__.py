"""``python -m edgepack`` runs the CLI."""

from __future__ import annotations

import sys

from edgepack.cli import main

sys.exit(main())
