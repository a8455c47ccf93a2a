"""KV sharing across agents (KVCOMM) and across models (DroidSpeak): the RoPE move (rope.py), the segment
store (segments.py), KVCOMM's anchors (anchors.py), the planner (planner.py) and the vLLM connector
(connector.py) of the served path, DroidSpeak's layer-group recompute (droidspeak.py) and its served
cross-model path (cross_reuse.py); docs/kvshare.md says how they fit."""
