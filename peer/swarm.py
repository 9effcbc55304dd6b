"""``python -m peer.swarm``: a whole small swarm on this machine; see :mod:`peer.app.swarm`."""
import sys

from peer.app.swarm import main

if __name__ == "__main__":
    sys.exit(main())
