"""``python -m peer``: see :mod:`peer.app.cli`."""
import sys

from peer.app.cli import main

sys.exit(main())
