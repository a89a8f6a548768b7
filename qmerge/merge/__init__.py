"""The weights as trained and the merge: bitsandbytes' NF4 round trip (or a pre-quantized checkpoint
read as stored), adapters read and validated as per-tensor edits, and the streamed merge into a
plain checkpoint. Builds no model and never imports eval or report."""
