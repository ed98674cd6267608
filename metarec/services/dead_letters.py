"""The dead-letter record's headers: why a record was refused, and where it came from.

A contract between the consumer, which appends them (:mod:`consumer.dlq`), and whoever
reads dead letters: ``metarec dlq inspect`` and ``replay`` (:mod:`metarec.services.operations`),
and any tool an operator writes. Kept here, apart from the producer that writes them, so
that the library's operator commands need nothing of the consumer service.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONSUMER_GROUP",
    "ERROR_CLASS",
    "ERROR_MESSAGE",
    "HEADERS_DROPPED",
    "KEY_TRUNCATED",
    "ORIGINAL_OFFSET",
    "ORIGINAL_PARTITION",
    "ORIGINAL_TIMESTAMP",
    "ORIGINAL_TOPIC",
    "VALUE_TRUNCATED",
]

ERROR_CLASS: Final = "metarec.error.class"
ERROR_MESSAGE: Final = "metarec.error.message"
ORIGINAL_TOPIC: Final = "metarec.original.topic"
ORIGINAL_PARTITION: Final = "metarec.original.partition"
ORIGINAL_OFFSET: Final = "metarec.original.offset"
#: The original record's timestamp in epoch ms, as decimal text; -1 when it had none.
ORIGINAL_TIMESTAMP: Final = "metarec.original.timestamp"
CONSUMER_GROUP: Final = "metarec.consumer.group"
#: Present only on a cut-down record: the original value's length in bytes.
VALUE_TRUNCATED: Final = "metarec.value.truncated"
#: Present only when the key itself was cut: the original key's length in bytes.
KEY_TRUNCATED: Final = "metarec.key.truncated"
#: Present only when the original headers were dropped: how many there were.
HEADERS_DROPPED: Final = "metarec.headers.dropped"
