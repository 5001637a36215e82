"""Fine-tuning: its config, SiFT, task metrics, and the entry (train.py): every seed through one runner."""
