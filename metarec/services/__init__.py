"""The services' input and output: Redis (one server or a Cluster), Kafka topics, the
aggregator process, metrics and health, outages, operator commands."""
