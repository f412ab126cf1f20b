"""The training driver: LightningCLI wiring, run directories, callbacks and figures for `histodistill fit`."""
