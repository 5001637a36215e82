"""Conversion: DeepSpeed checkpoint -> weights, native and Hugging Face export, HF import, the model card."""
