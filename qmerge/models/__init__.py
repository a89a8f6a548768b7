"""Models for computation: the base in 4-bit as the training run loaded it, the reference (base +
unmerged adapters through PEFT), candidates from checkpoints and baselines built in memory, float32
compute over 16-bit weights, the device, and the GPTQ engine's import."""
