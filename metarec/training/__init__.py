"""Meta-training with TensorFlow (the ``train`` extra), and when to retrain.

What the aggregator runs between the window of events and a published model version.
"""
