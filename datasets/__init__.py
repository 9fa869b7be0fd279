"""ssmlab.datasets: loaders and generators for real and synthetic data."""
