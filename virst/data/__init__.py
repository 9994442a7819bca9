"""Datasets: the generated "shapes" videos and readers of the public RVOS layouts."""
