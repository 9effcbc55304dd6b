"""What a volunteer runs: the CLI, the roles it starts, metrics, the status line and the local swarm launcher."""
