"""Agent attention: softmax attention routed through a few agent tokens (linear in N)."""
from .naive import agent_attention, agent_grid, build_agent_biases, pool_agents

__all__ = ["agent_attention", "pool_agents", "agent_grid", "build_agent_biases"]
