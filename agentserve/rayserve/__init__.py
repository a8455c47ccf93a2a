"""agentserve on Ray Serve: `ray.serve.llm` replicas running vLLM with the scheduler plugin."""
