"""agentserve: the serving layer for agent programs on vLLM."""
