"""The pure core: the model, adapting a user, ranking, the learner the consumer runs.

numpy (with faiss and river) only: no Kafka, no Redis, no TensorFlow, so that the
consumer, the aggregator and ``metarec eval`` all run exactly this code
(tests/test_layout.py keeps it so).
"""
