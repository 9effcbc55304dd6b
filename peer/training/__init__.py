"""Training: the model, the data, the synchronisation strategies and the trainer's loop. Never imports
:mod:`peer.hosting`."""
