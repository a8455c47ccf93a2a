"""KV sharing across agents (KVCOMM) and across models (DroidSpeak). So far: the RoPE move (rope.py);
the segment store, anchors, DroidSpeak and the served path are still to come (issue 6)."""
