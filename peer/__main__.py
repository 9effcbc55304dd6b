"""``python -m peer``: see :mod:`peer.app.cli`; ``python -m peer generate|export``: :mod:`peer.app.inference_cli`."""
import sys

if sys.argv[1:2] and sys.argv[1] in ("generate", "export"):
    from peer.app.inference_cli import main as inference_main

    sys.exit(inference_main(sys.argv[1:]))

from peer.app.cli import main

sys.exit(main())
