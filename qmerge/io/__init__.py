"""Inputs and outputs at the edges: lazy safetensors reading and streamed shard writing, hub
resolution, atomic stage outputs with manifests, text sources and token windows, the dtype table
and process memory. Imports nothing else of qmerge but errors and settings."""
