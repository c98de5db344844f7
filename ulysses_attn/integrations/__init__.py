"""Integrations with training frameworks (HF Trainer; TRL and DeepSpeed build on it)."""
