"""One LightningModule per method; each differs from the others only in its objective."""
