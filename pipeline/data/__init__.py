"""Training and evaluation data: webdataset loaders over data_prep folders and the failure budget."""
