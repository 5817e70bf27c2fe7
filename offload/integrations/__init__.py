"""Integrations with training frameworks: ``offload.integrations.hf.OffloadTrainer`` (Hugging Face Trainer)."""
