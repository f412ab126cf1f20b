"""`histodistill demo`: the whole chain on the real sample data, one resumable stage at a time."""
