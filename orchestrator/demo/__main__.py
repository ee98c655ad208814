"""``python -m orchestrator.demo`` (what ``make demo`` runs)."""

import sys

from orchestrator.demo.run import main

sys.exit(main())
