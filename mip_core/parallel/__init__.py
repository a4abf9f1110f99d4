"""Data parallelism and ZeRO-3 neuron slices: helpers that are no-ops when DeepSpeed or torch.distributed are absent or idle."""
