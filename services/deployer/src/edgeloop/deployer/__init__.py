"""edgeloop deployer: validated images to device groups in canary waves."""
