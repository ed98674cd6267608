"""metarec: a streaming meta-learning recommender."""
