"""ninpy: Network In Network from scratch."""
