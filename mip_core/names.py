"""Names the CLI lists before anything heavy is imported: defined here once, re-exported by their modules."""

SPLITS = ("forget", "retain", "test", "utility")  # evaluation splits (mip_core.evaluation.runner)
STATES = ("pending", "claimed", "done", "failed", "rejected")  # request states (mip_core.service.requests)
