"""qmerge: merge a QLoRA adapter into the NF4 weights it was trained against, re-quantize with
GPTQ, and measure what each step cost against the model as trained."""

__version__ = "0.1.0"
