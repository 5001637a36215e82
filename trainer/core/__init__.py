"""The runtime every run shares: config machinery, DeepSpeed engine and JSON, parallel setup, the step loop, checkpoints, elastic resume, preemption, metrics, the run directory."""
