"""Thin shims over optional runtimes (DeepSpeed, torch.distributed): no-ops when they are absent or idle."""
