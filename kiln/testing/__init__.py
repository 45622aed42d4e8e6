"""Test helpers: real-model fixtures that need no Hugging Face hub access."""
