"""The training engine: LightningCLI, run directories, callbacks, schedules."""
