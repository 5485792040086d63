"""The one training loop, with checkpoints, schedules, distributed set-up and logging."""
