"""Process entrypoints launched by the flows (``python -m mip_core.entrypoints.<name>``)."""
