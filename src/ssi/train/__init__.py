"""Training: the recipe shared by CPT and SFT (`recipe`), its resume state (`state`), loss, batch order
(`sampler`), process groups and FSDP2 (`distributed`), and throughput accounting (`flops`)."""
