"""SpecOffload runtime: checkpoint loading, model layers, the offload engine (torch)."""
