"""The shared data model: feature schema, Arrow <-> jagged tensors, loaders, simulated logs."""

# The split files every data folder holds (`<split>.parquet`), beside its schema.yaml.
SPLITS = ("train", "valid", "test")
