"""Mixture-of-experts layers over the swarm: expert UIDs and gating math, expert modules, the tensor wire
codec, the expert directory in the DHT, and the local and remote MoE layers. Imports only config/checkpoint."""
