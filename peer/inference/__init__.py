"""Running a trained model: from the live swarm or from one exported file (``python -m peer generate|export``)."""
