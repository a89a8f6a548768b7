"""Re-quantization: GPTQ through GPTQModel, round-to-nearest on the same grid, what servers can load,
and the size and bits per weight of each format."""
