"""KV sharing across agents (KVCOMM) and across models (DroidSpeak): not built yet."""
