"""Publishing to metarec: :class:`EventProducer` for apps, and the replay tool.

>>> from producer import EventProducer
>>> EventProducer.__name__
'EventProducer'
"""

from producer.event_producer import DEFAULT_PRODUCER_CONFIG, DeliveryError, EventProducer

__all__ = ["DEFAULT_PRODUCER_CONFIG", "DeliveryError", "EventProducer"]
