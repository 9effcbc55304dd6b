"""averaging — matchmaking through the DHT, butterfly all-reduce with repair, gossip, compression,
robust aggregation, state download."""
from .averager import Averager, StepResult
from .config import AveragerConfig
from .gossip import Gossip
from .matchmaking import MatchmakingFailed

__all__ = ["Averager", "AveragerConfig", "Gossip", "StepResult", "MatchmakingFailed"]
