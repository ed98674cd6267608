"""Datasets: MovieLens releases, the synthetic streams, and the names ``--data`` takes."""
