"""SALS as a cache mode: latent pre-RoPE keys, per-step latent top-k selection, and its exact replay."""
