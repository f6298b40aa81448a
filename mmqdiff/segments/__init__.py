"""The project's own concept: one quantized model per timestep segment, and the run folder that stores them."""
