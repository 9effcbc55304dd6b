"""What a volunteer runs, in layers: :mod:`peer.config` and :mod:`peer.checkpoint` <- :mod:`peer.moe` <-
{:mod:`peer.hosting`, :mod:`peer.training`} <- :mod:`peer.app`; :mod:`peer.swarm_state` is a read-only view of a
swarm. See docs/ARCHITECTURE.md."""
