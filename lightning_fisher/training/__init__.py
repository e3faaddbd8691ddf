"""Lightning adapters: datamodules and callbacks on top of the plain-PyTorch core."""
