"""``python -m seadragon_proxy`` is the ``seadragon-proxy`` command."""

import sys

from .cli import main

sys.exit(main())
